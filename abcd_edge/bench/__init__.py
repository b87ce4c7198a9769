"""The benchmark: hardware tiers x budgets x samplers x quality targets x seeds, ABCD against baselines.

``abcd-edge bench --grid quick --out bench/quick`` runs a grid and writes, into ``--out``:

* ``results.csv``  one row per request (a batch of images): method, tier, budget, sampler, rho,
  seed, latency, steps, deadline_met, energy, teacher distance, cost-predictor error, ...
* ``summary.md``   a table per metric (methods as rows, best per column marked), the wins table,
  the issue's goals checked, the predictor error;
* PNG plots        success vs budget, feature-FID vs budget, latency histograms, utilisation;
* ``bench.json``   the exact configuration, the resolved tiers, the machine, tuned thresholds;
* ``features/``    feature-net features of every image (so summaries survive a resume);
* ``teacher/``     the many-step DDIM teachers (cached per request seed).

Methods (rules documented in bench/README.md):

``uniform``  time-uniform, K = most steps that fit B at the profile's p99 (``CostModel.steps_that_fit``)
``karras``   Karras (rho=7) sigmas, same K
``logsnr``   log-SNR-uniform sigmas, same K
``ays``      the AYS-like optimised static schedule of ``<controller>/ays.json`` for K (else unavailable)
``stepdrop`` uniform K, stopping once sigma falls below a threshold tuned per (tier, budget, sampler, rho)
``buco-mwg`` the controller's budget-conditioned density, K from the profile's p50 (no tail margin),
             no exit, no online correction, no guard
``abcd``     ``AnytimeRuntime.generate`` with the calibrated controller (rule-based when none: labelled)
``oracle``   per image, the best stopping step in hindsight (smallest teacher distance among the steps
             finished within B) along one time-uniform trajectory of K_p50 steps

Static methods run on the same clock as ABCD (wall clock on real tiers, ``ReplayClock`` on replay
tiers); a late image is a miss. Nothing here imports torch.

The modules, in the order a run uses them::

    grid      GridSpec, the named grids, parsing and validation
    tiers     Tier, resolve_tiers, open_tier -> TierSession (both runtimes over one denoiser)
    load      busy_core (one CPU core kept busy; also the runtime bench's)
    teacher   TeacherCache (the many-step DDIM per request seed), request_noise
    ays       the AYS-like schedule table of a calibration folder
    methods   Plan, plan_methods, tune_stepdrop, run_static / execute (one request of a method)
    store     results.csv and features/ (rows, block keys, cost terms)
    runner    run_grid / bench_main: blocks, resume, bench.json
    metrics   success, bootstrap CIs, feature-FID, cells, predictor error, wins, goals; Quality
    summary   summary.md / summary.json; plots: the PNGs
    runtime_bench, schedule_fid   the two other benches (`abcd-edge bench-runtime`, `bench-schedules`)
"""
from abcd_edge.bench.grid import GRIDS, METHODS, GridSpec, parse_grid_args
from abcd_edge.bench.runner import bench_main, run_grid
from abcd_edge.bench.summary import summarize

__all__ = ["GRIDS", "METHODS", "GridSpec", "bench_main", "parse_grid_args", "run_grid", "summarize"]
