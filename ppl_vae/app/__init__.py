"""The application layer: the only code that knows option names and run directories.

:mod:`.config` (what defines a run, every compatibility rule), :mod:`.registry`
(named models -> networks, model and guide), :mod:`.runs` (locked run
directories, :func:`~.runs.open_run`), :mod:`.commands` (one module per
``ppl-vae`` subcommand) and :mod:`.figures` (every picture).
"""
