"""The names of the files a run leaves in its folder, in one place: the training driver and the
sweep write them; the tracking, the dashboard and the scheduler's resume read them.

<run folder>/history.jsonl   one row per epoch (train.history_callback), across restarts
<run folder>/best.json       the best checkpoint and its metrics (train.summarize)
<experiment>/runs/<trial>/   each Tune trial's Train run folder (tune.make_trainable)
<experiment>/best.json       the sweep's best trial (tune.summarize_sweep)
"""

HISTORY_FILE = "history.jsonl"
BEST_FILE = "best.json"
RUNS_DIR = "runs"
