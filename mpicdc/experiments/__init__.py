"""The paper's experiments and beyond: one module per figure, each with ``main(argv)``.

Run them through ``jobs/NAME.sh`` (locally or with ``sbatch``) or as
``python -m mpicdc.experiments.NAME``.  Each writes CSV data and a PNG plot
under ``results/NAME/`` and prints a one-paragraph summary with the headline numbers.
"""
