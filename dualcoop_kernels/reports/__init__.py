"""What comes after training, for people: ``report.py`` one self-contained HTML page of a run (settings,
curves, metrics beside chance, per-class tables, the worst mistakes with their evidence maps);
``maps.py`` where each class finds its evidence in an image (``dualcoop explain``). Both read a run
folder (training/) and never write into the training's own files.
"""
