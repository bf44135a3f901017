"""The fault suite (issue 4): each guarantee of the contract under the fault that threatens it.

Every scenario runs the real service (mostly as a subprocess, `python -m consumer run`) against a
real broker and the Campaign Monitor simulator over HTTP, and ends by comparing every list with the
state computed independently from the produced events (`consumer.devtools.synthetic`) and by
checking the group's committed offsets against what was really applied. `tests/faults/support.py`
holds the shared machinery. `CMSYNC_CHAOS=1` (`make chaos`) runs the same scenarios larger.
"""
