"""Experiments over the library, each also a ``thermo-kfac`` sub-command (``register``).

- :mod:`.training`: ``train`` / ``compare`` (package: options, optimizers, run, experiment,
  outputs, cli); :class:`~.training.TrainingRun` is the public run class.
- :mod:`.noise_study`: ``noise-study`` (package: study, outputs, plots, cli).
- :mod:`.hardware`: ``calibrate`` and ``project``; :mod:`.placement`: ``placement``;
  :mod:`.fisher_error`: ``fisher-error``; :mod:`.bench`: ``bench``.
- :mod:`.launch`: the torchrun launcher of ``train`` and ``config_from_args``.
- :mod:`._io`: atomic writes, JSON conversion, text tables, seconds, CLI list parsers;
  :mod:`._plotting`: figures for files without touching matplotlib's global state.
"""
