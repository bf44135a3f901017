"""The service's internal tunables, in one place.

What an operator may change is a setting (`consumer.settings`, documented in
docs/configuration.md). What is here is not: values chosen by measurement or by the arithmetic
of another limit, each with the reason it has the value it has. Change one here, run
`make chaos` and `make bench`, and say why in the commit. Limits of Campaign Monitor's API
itself (rows per import, page sizes) are facts of the API, not tunables: they stay in
`consumer.campaign_monitor.client`.
"""

from __future__ import annotations

from typing import Final

# ------------------------------------------------------------------ shutdown and rebalance
# (consumer.app; the sequence is in its docstring)

#: Part of the shutdown budget kept for committing and closing (steps 3 and 4).
CLOSE_RESERVE_S: Final = 3.0
#: Longest wait for each of the Kafka clients to close when no shutdown deadline applies.
CLOSE_TIMEOUT_S: Final = 10.0
#: Part of the shutdown budget kept for the process to exit once everything is closed.
EXIT_RESERVE_S: Final = 1.5
#: Longest wait for the revoked partitions' changes to be flushed during a rebalance; with the
#: commit that follows it must fit in REBALANCE_TIMEOUT_MS.
REVOKE_BUDGET_S: Final = 20.0

#: Thresholds of the cyclic garbage collector while the service runs (Python's are 700, 10, 10).
#: The buffers hold up to CMSYNC_MAX_PENDING changes, and at Python's defaults collections of
#: the young generations ran so often, and full ones traversed so many live entries, that the
#: collector took over half of the intake time (bench/intake.py). The service makes no
#: reference cycles on its hot path, so collecting less often frees the same memory, later
#: (aiokafka's, when intake pauses, are collected on resuming: Source._apply_backpressure).
GC_THRESHOLDS: Final = (50_000, 50, 100)

# ------------------------------------------------------------------ Kafka (consumer.source)

#: Largest number of records handed to the intake per fetch.
MAX_RECORDS_PER_FETCH: Final = 5000
#: How long one fetch waits for data; bounds how quickly the loop notices a stop request.
FETCH_TIMEOUT_MS: Final = 200
#: Resume fetching once pending changes fall to this fraction of CMSYNC_MAX_PENDING.
LOW_WATER: Final = 0.5
#: How long the group waits for this member to rejoin during a rebalance: the revocation
#: callback (flush and commit the revoked partitions, REVOKE_BUDGET_S) must fit inside it.
REBALANCE_TIMEOUT_MS: Final = 60_000

#: Dead-letter producer's backoff while the broker refuses or cannot be reached: first window
#: 0.1 s, at most 5 s (a dead letter holds its partition's commit; come back soon once the
#: broker is back).
DEAD_LETTER_BACKOFF_BASE_S: Final = 0.1
DEAD_LETTER_BACKOFF_CAP_S: Final = 5.0
#: The dead-letter producer's max_request_size: a letter carries its record (up to what the
#: input topic accepts) plus a few headers. A larger one goes out shortened (consumer.deadletter).
DEAD_LETTER_MAX_REQUEST_BYTES: Final = 2 * 1024 * 1024

# ------------------------------------------------------------------ flushing (consumer.flusher)

#: Removals per batch, and removal batches of one destination in flight at once (all of
#: them while draining). Few: a removal taken into flight can no longer be cancelled by a
#: re-entry, and when the key's rate is the bottleneck a taken removal may wait long for its
#: slot. Kept in the buffer instead, an exit and its re-entry coalesce into one import row.
REMOVAL_BATCH_SIZE: Final = 25
REMOVAL_BATCHES_IN_FLIGHT: Final = 1
#: Imports of one destination in flight at once (also the removal batches while draining).
#: Past it, adds wait in the buffer, where newer changes still coalesce into them, instead of
#: in the gateway's line (whose limit, CALLS_IN_FLIGHT, counts calls, not batches).
BATCHES_IN_FLIGHT: Final = 4
#: Longest idle wait of the flusher's loop (s): it refreshes the pending gauge and re-checks
#: the buffer even if a wake-up was missed. Shortest (s): a due time in the past must not spin
#: the loop.
IDLE_WAIT_S: Final = 1.0
MIN_WAIT_S: Final = 0.01

# ------------------------------------------------------------------ Campaign Monitor calls
# (consumer.gateway, consumer.ratelimit, consumer.campaign_monitor.client)

#: Exponential backoff for transient errors: first window (s), cap (s). Full jitter.
API_BACKOFF_BASE_S: Final = 0.5
API_BACKOFF_CAP_S: Final = 30.0
#: A fatally failing destination (bad key, bad list) is retried this often, one log line each.
STALL_RETRY_S: Final = 60.0
#: Stalled calls of one destination wake within moments of each other: one log line for all
#: of them as long as the previous one is at most this much less than STALL_RETRY_S old.
STALL_LOG_SLACK_S: Final = 1.0
#: Calls of one destination under way at once, retries and their backoff included: with
#: imports and removals sent independently, this keeps an outage from multiplying the retries.
CALLS_IN_FLIGHT: Final = 4
#: Place in the rate limiter's line (lower first): an import carries up to 1000 changes; a
#: listing page (consent) is read before the import that waits for it.
IMPORT_PRIORITY: Final = 0
LISTING_PRIORITY: Final = IMPORT_PRIORITY
REMOVAL_PRIORITY: Final = 1
#: The imports of a list being backfilled (a destination added later) wait this many steps
#: behind live changes of other lists; aging still lets them through when nothing else waits
#: for that long.
BACKFILL_PRIORITY: Final = 3
#: One step of priority counts as arriving this much later in the limiter's line (aging): a
#: removal waits at most this long behind imports that keep arriving.
PRIORITY_STEP_S: Final = 1.0
#: An address Campaign Monitor refused for being written too often ("added too many times too
#: quickly") is tried again after this long; the rest of its import goes on at once.
ADDRESS_HOLD_S: Final = 10.0
#: Consent (consumer.consent): a write that could override an opt-out is preceded by a read of
#: the list's opt-outs at most this old (one read serves every such write of the list in that
#: time: two or three requests per list per second at most, and only while they flow).
CONSENT_FRESH_S: Final = 1.0
#: An incremental read starts this long before the newest opt-out date seen (minute precision
#: of the filter; a bounce processed late may carry an earlier date).
CONSENT_INCREMENTAL_MARGIN_S: Final = 600.0
#: Until a list's first full read is done, batches of at most this many addresses are asked
#: about one by one (one GET each), so removals keep flowing meanwhile.
CONSENT_PER_ADDRESS_LIMIT: Final = 10
#: How far ahead the rate limiter reserves slots (see `AimdRateLimiter.acquire`).
LOOKAHEAD_S: Final = 0.3
#: Connections kept to the API: far above what one process needs at the configured request
#: rate (flushers are few and calls are short), low enough not to hammer one host if
#: something loops.
CONNECTION_LIMIT: Final = 16

#: How often the service looks again for an input topic that does not exist yet.
INPUT_TOPIC_RETRY_S: Final = 5.0
#: The state producer's linger: claims and changelog records of one batch go out together.
#: `changelog.send_batched` closes its batches (they are complete when sent), so they do not
#: wait for it; it is for whatever else the producer may send.
STATE_LINGER_MS: Final = 5
#: The state producer's largest record batch: a checkpoint's claims and changelog records go
#: out in few batches (the default, 16 KiB, made one batch and one future per ~150 records).
#: Under the broker's default message.max.bytes (1 MiB).
STATE_BATCH_BYTES: Final = 512 * 1024
#: How long a flusher waits before taking a batch again whose writes could not be recorded as
#: under way (the membership state's changelog did not acknowledge).
SEND_RETRY_S: Final = 1.0

#: Backfill (a destination added for a segment the state knows): members read and sent as
#: claims per page, one checkpoint each; the next page waits until fewer than BACKFILL_AHEAD
#: of the list's changes wait in this process (claims not yet taken, and its buffer, besides
#: the imports in flight): five imports ahead, so imports stay full, while the claims of other
#: lists never queue behind more than that (about a second of stage 2).
BACKFILL_PAGE: Final = 1000
BACKFILL_AHEAD: Final = 5000
#: A backfill page whose checkpoint failed is tried again after this long.
BACKFILL_RETRY_S: Final = 1.0
#: How often the service looks at the destinations file for a change (a mounted ConfigMap is
#: updated in place, within about a minute); SIGHUP reloads at once.
RELOAD_POLL_S: Final = 10.0

#: glibc malloc arenas of `cmsync run` (see `consumer.app.limit_malloc_arenas`).
MALLOC_ARENAS: Final = 2
#: The fetch size of the consumer that reads single input records back for dead letters: above
#: the largest record the schema allows (64 KiB), far below aiokafka's 1 MiB default. aiokafka
#: keeps what a read fetched for a while: 3,000 dead letters in a row (every record refused by
#: a field type) took the process to 2.7 GiB with 1 MiB fetches, 351 MiB with 256 KiB and
#: 209 MiB with 80 KiB (the same run without dead letters: 137 MiB).
READ_BACK_FETCH_BYTES: Final = 80 * 2**10

#: `cmsync reconcile`: a destination whose listing made no progress for this long (Campaign
#: Monitor unreachable, answering 5xx or 429 throughout) fails, and the command exits 1
#: naming it; the gateway would otherwise retry it forever, as the service must.
RECONCILE_STALL_S: Final = 120.0
#: `cmsync reconcile`: listing pages of Active members read ahead while the state is still
#: being restored (the restore of a million addresses takes ~9 s, the listing 100 s at 10
#: requests/s: in parallel, not one after the other). About 1.3 KB a member as read:
#: 50 pages, ~65 MiB at most.
RECONCILE_READ_AHEAD_PAGES: Final = 50
