"""The benchmarks: each module of this package is one benchmark with ``main(argv) -> int``, run as
``cloq bench NAME`` (the registry, and the list in ``cloq bench --help``, is
``cloq_engine/bench.py``) or ``python -m benchmarks.NAME`` from the repository root.

``common.py`` holds what they share (timing, weight rotation, GPU ceilings, packed-weight builder,
JSON lines); ``baselines.py`` the peers they compare against; ``session*.py`` the GPU session
(``bash benchmarks/gpu_session.sh``). They ship with the source tree, not with the installed
package. Every benchmark prints a table, writes JSON as it goes, and asserts no timing.
"""
