"""The adapter scripts, run by path in each engine's own interpreter (`python ADAPTER --versions`,
`python ADAPTER FOLDER`). They import nothing of llamapro: only `adapter_io` beside them (Python puts a
script's folder on `sys.path`), the engine, and numpy. Imported as this package only by llamapro's tests
and type checker.
"""
