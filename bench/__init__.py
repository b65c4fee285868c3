"""snapagentd's benchmarks against floors measured in the same run (`python -m bench`).

See docs/benchmarks.md for what each benchmark measures, the floor it is compared with, the
targets and the figures of the last full run.
"""
