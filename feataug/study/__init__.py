"""``feataug study``: run a grid of pretraining experiments and compare them.

A study grid (YAML) names a base pretraining config and lists runs as config overrides::

    base: ../pretrain/tiny_moco_fa_r18.yaml   # relative to the grid file
    seeds: 2                                  # default for --seeds
    jobs: 1                                   # default for --jobs
    prepare: [fashion-mnist]                  # `feataug prepare-data` these first
    random_init: true                         # add an untrained-trunk reference row
    overrides: {DATA.ROOT: "{data}/fashion-mnist", DATA.FORMAT: idx, SOLVER.MAX_ITER: 200}
    eval:                                     # labelled splits for kNN / linear top-1
      train: "{data}/fashion-mnist/train-images-idx3-ubyte.gz"
      val: "{data}/fashion-mnist/t10k-images-idx3-ubyte.gz"
      format: idx
      max_train: 5000
      max_val: 5000
    blocks:
      - name: moco
        overrides: {MODEL.METHOD: moco}
        variants:                             # named override sets
          baseline: {FA.ENABLED: false}
          fa: {FA.ENABLED: true}
        axes:                                 # expanded as a product
          FA.OP: [noise, extrapolate]
          DA.STRENGTH: [weak, strong]
        skip_invalid: false                   # true: drop combinations the model refuses
    slurm:                                    # defaults of --slurm (its flags win)
      nodes: 1
      gpus_per_node: 8                        # one task per GPU; 0: a CPU job
      time: 240                               # minutes
      partition: gpu
      account: my_account
      args: {qos: high, mem: 64G}             # any other sbatch option

``{data}`` in any string stands for the dataset root (``$FEATAUG_DATA``, else ``datasets``).
Each run of a block is ``base <- grid overrides <- block overrides <- one axes combination <-
one variant`` (a block without variants has one, unnamed). When FA ends up disabled, the FA keys
of the run are dropped (they mean nothing then), so equal runs collapse into one; a run's name is
the block name, the variant name and ``key=value`` for each axis value it really uses.

The *matching baseline* of a run is the run with FA disabled whose resolved config is the same
once the whole ``FA`` node is set aside (same method, backbone, DA, solver, ...).

Every (run, seed k) trains in ``OUT/runs/<name>/seed<k>`` with ``SEED k`` and, unless the grid's
overrides set it, ``SOLVER.CHECKPOINT_PERIOD 0``: ``last.pth`` alone, no numbered copies
(``--dry-run`` prints the disk the study will use, ``disk``). ``job.json`` is written
when a job starts and ``result.json`` (atomically) when its evaluation is done; a rerun skips jobs
with a result and resumes the others from their ``last.pth``; a folder that holds a different
config is refused. After every job ``OUT/results.csv`` (one row per run x seed) and
``OUT/results.md`` (mean ± std over seeds, delta vs. the matching baseline) are rewritten; at the
end ``OUT/plots/<AXIS>.png`` shows one bar chart per study axis (a config key that varies).

``--slurm`` submits the unfinished jobs instead, one Slurm array task each (submitit, the
``cluster`` extra), and returns; the same bookkeeping lets a rerun skip finished and queued jobs,
resubmit the failed and missing ones, and write the reports once all have finished
(``feataug.study.slurm``).

Evaluation: the trunk of ``last.pth`` (or an untrained one for ``random_init``) embeds the
labelled splits with the evaluation transform at ``DATA.IMAGE_SIZE``; weighted kNN (k=200,
tau=0.1) on L2-normalised features and, with ``eval.linear``, a linear classifier fitted to
convergence (L-BFGS, multinomial logistic regression on standardised features) give top-1 (%).
"""

from pretrain.utils.stats import mean_std

from .cli import add_arguments, format_plan, main
from .grid import Grid, Run, StudyError, load_grid
from .jobs import Job, execute, finished, make_jobs, pretrain_and_evaluate, run_study
from .report import markdown_table, plot_axis, summarize, write_reports

__all__ = ["Grid", "Job", "Run", "StudyError", "add_arguments", "execute", "finished",
           "format_plan", "load_grid", "main", "make_jobs", "markdown_table", "mean_std",
           "plot_axis", "pretrain_and_evaluate", "run_study", "summarize", "write_reports"]
