"""The `tulip-mega` sub-commands, one module per command: each `register(sub)` adds its own
sub-parser to `sub` (argparse sub-parsers) and sets `func`, the handler `tulip_mega.cli.main`
calls with the parsed arguments and whose return value is the exit status.

Handlers import what they run when they run, so `tulip-mega config --keys` or `data synth` do
not pay megatron-core's import time.
"""
