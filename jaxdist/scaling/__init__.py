"""How many devices do I need? A measured scaling study and the cost model fitted to it.

`python -m jaxdist.scaling EXPERIMENT` (`__main__.py`) measures (`measure.py`: the step,
its compute alone, the gradient's all-reduce alone, in interleaved rounds), fits and checks
the model of `jaxdist.scaling.costmodel` (`study.py`), and reports: text, `scaling.json` and
`scaling.png` (`report.py`).
"""
