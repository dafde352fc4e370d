from vitune.cli import run

run()
