"""Fuzzing harness for every parser of untrusted input (atheris/libFuzzer).

``fuzz.targets`` holds the targets (pure functions of one input's bytes, no
atheris import), ``fuzz/corpus/<target>/`` their checked-in seeds,
``fuzz.seeds`` rebuilds the seeds derived from the project's serializers and
tests, ``fuzz.worker`` runs one target under libFuzzer and ``fuzz.run`` runs
targets one after another within a time bound (``make fuzz``, CI).
"""
