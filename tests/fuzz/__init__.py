"""Fuzzing every command and file a user controls: no traceback ever reaches the user.

How it is built:

- `strategies.py`: hypothesis strategies for what a user writes or points vitune at (data
  rows of every format, YAML configs, `--set` overrides, argument vectors, tokenizer and
  run folders), valid ones and mutations of valid ones.
- `checker.py`: runs `vitune.cli.main(argv)` in-process and checks the property: it returns
  (never raises) 0, 2 or 130, and a 2 prints one line "error: ..." (or click's usage text).
- `targets.py`: the registry, a list of `FuzzTarget(name, strategy, run)`. A new command
  joins by adding its inputs there; `test_fuzz.py` runs one property test over every entry.
- `test_regressions.py`: the bugs fuzzing found, each as a plain test with its exact message.

`VITUNE_FUZZ_EXAMPLES=N` sets the examples per target (`make fuzz` runs 2000).
"""
