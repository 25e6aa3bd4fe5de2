"""jaxdist experiments: one module each, run with `python -m jaxdist.run NAME`.

Each module opens with a docstring (first line: what it trains; then the command, the
expected runtime and the expected result) and defines `config() -> jaxdist.Config` and
`build(config) -> jaxdist.Experiment`.
"""
