"""``lpm-llm``: run or calibrate an experiment from a YAML file.

    lpm-llm run experiments/covid_nyc.yaml [--out DIR [--overwrite]] [--set key.path=value ...] [--quiet]
    lpm-llm calibrate experiments/covid_nyc.yaml [--out DIR [--overwrite]] [--set ...]
    lpm-llm list                      # the bundled experiments, archetypes and prompts
    lpm-llm probe experiments/covid_nyc.yaml [--out DIR]         # P(yes) as each prompt variable moves
    lpm-llm fidelity experiments/covid_nyc.yaml [--sample 500]   # archetypes against individuals
    lpm-llm forecast EXPERIMENT.yaml --as-of DATE [--horizon 4] [--out DIR]
    lpm-llm assimilate EXPERIMENT.yaml --from DATE --to DATE [--every 7] [--out DIR]   # resumes DIR

Exit status: 0 done; 2 an expected failure (a bad config or path, an unusable --out or cache
folder, a missing API key, an unreachable or misbehaving endpoint, unusable answers, a missing
extra), with one line on stderr saying what to do; 130 interrupted by Ctrl-C (SIGINT), 143 by
SIGTERM: the run folder keeps its manifest (status "interrupted"); anything else is a bug (1).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that it unwinds like Ctrl-C (manifest, cleanup)."""

_EPILOG = "Example: lpm-llm run experiments/covid_nyc.yaml --set days=30 --set llm.concurrency=2"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lpm-llm", description="Large Population Models with LLM archetypes.",
                                epilog=_EPILOG)
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (("run", "run an experiment (all scenarios and seeds)"),
                       ("calibrate", "calibrate an experiment's parameters to the bundled NYC data")):
        s = sub.add_parser(name, help=text, description=text, epilog=_EPILOG)
        s.add_argument("experiment", help="experiment YAML (a path, or the name of a bundled one)")
        s.add_argument("--out", help="output folder (default: runs/NAME-TIMESTAMP); must be new or empty")
        s.add_argument("--overwrite", action="store_true",
                       help="reuse a non-empty --out run folder: its contents are removed first")
        s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set population.scale=0.02 (repeatable)")
        s.add_argument("--quiet", "-q", action="store_true", help="no progress bars; warnings only")
        s.add_argument("--verbose", "-v", action="store_true", help="debug logging")
        if name in ("run", "calibrate"):
            s.add_argument("--nproc", type=int, default=1, metavar="N",
                           help="N local processes started by torchrun: run shares its simulations (the config's "
                                "`distributed:`); calibrate makes each a data holder (`privacy:`)")
    sub.add_parser("list", help="list the bundled experiments, archetypes and prompts")
    _behaviour_parsers(sub)
    # -- ablate (issue 14): the same calibration with other behaviour sources, scored out of sample
    text = "compare behaviour sources (LLM, heuristic, constant, none) calibrated alike, scored on held-out data"
    s = sub.add_parser("ablate", help=text, description=text, epilog=_EPILOG)
    s.add_argument("experiment", help="experiment YAML (a path, or the name of a bundled one)")
    s.add_argument("--out", help="output folder (default: runs/NAME-ablate-TIMESTAMP); must be new or empty")
    s.add_argument("--overwrite", action="store_true", help="reuse a non-empty --out run folder")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable)")
    s.add_argument("--forecast-date", dest="forecast_dates", action="append", metavar="YYYY-MM-DD",
                   help="epidemic: a forecast date (repeatable; default 2020-04-11, 2020-05-02, 2020-05-23)")
    s.add_argument("--steps", type=int, help="Adam steps per source (default: 15 epidemic, calibration.steps labour)")
    s.add_argument("--source", dest="sources", action="append", metavar="NAME",
                   help="a behaviour source to include (repeatable; default: all)")
    s.add_argument("--rounds", type=int, default=3, help="most rounds of re-asking the LLM (default 3)")
    s.add_argument("--quiet", "-q", action="store_true", help="warnings only")
    s.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    _forecast_parsers(sub)
    return p


# -- behaviour reports (issue 14): lpm-llm probe, lpm-llm fidelity --------------------------------
def _behaviour_parsers(sub) -> None:
    texts = {"probe": "the sensitivity report: P(yes) of each decision as one prompt variable moves, the others "
                      "held (behaviour.csv and a plot)",
             "fidelity": "how well the archetypes stand in for individuals: a stratified sample of agents asked "
                         "with their own attributes, compared with their archetype's answer, for several "
                         "archetype sets (fidelity.csv, fidelity_sets.csv, a plot of fidelity against cost)"}
    for name, text in texts.items():
        s = sub.add_parser(name, help=text, description=text, epilog=_EPILOG)
        s.add_argument("experiment", help="experiment YAML (a path, or the name of a bundled one)")
        s.add_argument("--out", help=f"output folder (default: runs/NAME-{name}-TIMESTAMP); must be new or empty")
        s.add_argument("--overwrite", action="store_true", help="reuse a non-empty --out run folder")
        s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value (repeatable)")
        s.add_argument("--quiet", "-q", action="store_true", help="warnings only")
        s.add_argument("--verbose", "-v", action="store_true", help="debug logging")
        if name == "probe":
            s.add_argument("--variables", help="sweep only these, comma-separated (e.g. cases_week,policies,"
                                               "archetype); default: every variable, attribute and archetype")
        if name == "fidelity":
            s.add_argument("--sample", type=int, default=500, help="agents in the stratified sample (default 500)")
            s.add_argument("--dates", type=int, default=3, help="decision dates asked (default 3)")
            s.add_argument("--sets", default="default",
                           help="archetype sets: 'default' (the experiment's, grouping, k-means K=10,30,64,100,"
                                "300) or a comma-separated list of archetype YAML files")


def _behaviour(args, exp):
    import time
    from pathlib import Path

    out = Path(args.out) if args.out else Path("runs") / f"{exp.config.name}-{args.command}-" \
        f"{time.strftime('%Y%m%d-%H%M%S')}"
    if args.command == "probe":
        from lpm_llm.runner.behaviour_run import probe_experiment

        probe_experiment(exp, out, overwrite=args.overwrite,
                         variables=args.variables.split(",") if args.variables else None)
    else:
        from lpm_llm.runner.behaviour_run import fidelity_experiment

        fidelity_experiment(exp, out, overwrite=args.overwrite, sample=args.sample, n_dates=args.dates,
                            sets=args.sets)
    return type("Result", (), {"out_dir": out})


# -- forecast and assimilate (issue 16) -----------------------------------------------------------

def _forecast_parsers(sub: argparse._SubParsersAction) -> None:
    """``forecast EXPERIMENT --as-of DATE`` and ``assimilate EXPERIMENT --from DATE --to DATE``."""
    for name, text in (("forecast", "fit with the data known on a date, forecast 1-N weeks as Hub quantiles"),
                       ("assimilate", "weekly fits and forecasts over a range of dates (resumable)")):
        s = sub.add_parser(name, help=text, description=text)
        s.add_argument("experiment", help="experiment YAML (a path, or the name of a bundled one)")
        if name == "forecast":
            s.add_argument("--as-of", required=True, help="ISO date: data after it are not used")
            s.add_argument("--overwrite", action="store_true", help="reuse a non-empty --out run folder")
        else:
            s.add_argument("--from", dest="first", required=True, help="first as-of date (ISO)")
            s.add_argument("--to", dest="last", required=True, help="last as-of date (ISO)")
            s.add_argument("--every", type=int, default=7, help="days between forecasts (default 7)")
        s.add_argument("--horizon", type=int, default=4, help="weeks ahead (default 4)")
        s.add_argument("--steps", type=int, help="Adam steps per update (default 3)")
        s.add_argument("--first-steps", type=int, help="Adam steps of the first update (default: --steps)")
        s.add_argument("--first-lr", type=float, help="Adam's learning rate of the first update (default: "
                                                      "calibration.lr, as every later update)")
        s.add_argument("--track-weeks", type=int, help="a warm update first searches a common factor of the "
                                                       "transmission change of the months these last known weeks "
                                                       "touch (default 0: none; see ForecastSettings.track_weeks)")
        s.add_argument("--members", type=int, help="ensemble members (default 16)")
        s.add_argument("--targets", help="comma-separated forecast targets (default: calibration.targets)")
        s.add_argument("--reporting-lag-days", type=int, help="last days treated as unreported (default 0)")
        s.add_argument("--parameters", help="comma-separated calibrated parameters (default: calibration.parameters, "
                                            "else every declared one)")
        s.add_argument("--smoothness", type=float, help="penalty weight on month-to-month moves of the fitted "
                                                        "transmission change (default 0; the 2021 fit used 0.25)")
        s.add_argument("--start", choices=("experiment", "prior"), default="experiment",
                       help="first fit starts from the experiment's parameters (default) or the package's "
                            "defaults ('prior': a clean back-test, nothing fitted after the as-of date)")
        s.add_argument("--out", help="output folder (default: runs/NAME-forecast-...); assimilate resumes it")
        s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value (repeatable)")
        s.add_argument("--quiet", "-q", action="store_true", help="no progress bars; warnings only")
        s.add_argument("--verbose", "-v", action="store_true", help="debug logging")


def _run_forecast(exp, args) -> object:
    import time
    from pathlib import Path

    from lpm_llm.runner.forecast_run import assimilate_experiment, forecast_experiment

    options = {"horizon": args.horizon, "steps": args.steps, "first_steps": args.first_steps,
               "first_lr": args.first_lr, "track_weeks": args.track_weeks,
               "members": args.members, "reporting_lag_days": args.reporting_lag_days, "smoothness": args.smoothness,
               "targets": tuple(args.targets.split(",")) if args.targets else None,
               "parameters": tuple(args.parameters.split(",")) if args.parameters else None}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if args.command == "forecast":
        out = Path(args.out) if args.out else Path("runs") / f"{exp.config.name}-forecast-{args.as_of}-{stamp}"
        return forecast_experiment(exp, args.as_of, out, args.overwrite, start=args.start, **options)
    out = Path(args.out) if args.out else Path("runs") / f"{exp.config.name}-assimilate-{args.first}-{args.last}"
    return assimilate_experiment(exp, args.first, args.last, out, every=args.every, start=args.start, **options)


def _progress_factory(quiet: bool):
    if quiet:
        return None
    from functools import partial

    from tqdm.auto import tqdm

    return partial(tqdm, leave=False, dynamic_ncols=True, file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "list":
        from lpm_llm.resources import resource_dir

        for kind in ("experiments", "archetypes", "prompts"):
            names = sorted(p.name for p in resource_dir(kind).glob("*.yaml"))
            sys.stdout.write(f"{kind}: {', '.join(names)}\n")
        return 0

    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # Third-party chatter (HTTP requests, the SDK) only in verbose mode.
    for noisy in ("httpx", "httpcore", "openai"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.verbose else logging.WARNING)

    from lpm_llm.llm.errors import LLMError
    from lpm_llm.runner.config import ConfigError
    from lpm_llm.runner.experiment import Experiment

    previous = _terminate_on_sigterm()
    try:
        exp = Experiment.from_yaml(args.experiment, args.overrides, progress=_progress_factory(args.quiet))
        if getattr(args, "nproc", 1) != 1:  # validated above: a bad config fails here, before any rank starts
            from lpm_llm.distributed import launch

            if args.nproc < 1:
                raise ConfigError(f"--nproc must be at least 1, got {args.nproc}")
            launch(sys.argv[1:] if argv is None else list(argv), args.nproc)
        if args.command in ("probe", "fidelity"):
            exp.check_devices()
            result = _behaviour(args, exp)
        elif args.command == "ablate":
            from lpm_llm.runner.ablate import ablate_experiment

            result = ablate_experiment(exp, args.out, overwrite=args.overwrite, forecast_dates=args.forecast_dates,
                                       steps=args.steps, sources=args.sources, rounds=args.rounds)
        elif args.command in ("forecast", "assimilate"):
            result = _run_forecast(exp, args)
        else:
            runner = exp.run if args.command == "run" else exp.calibrate
            result = runner(args.out, overwrite=args.overwrite)
    except (ConfigError, LLMError, FileNotFoundError) as e:
        sys.stderr.write(f"lpm-llm: error: {_one_line(e)}\n")
        return 2
    except ValueError as e:  # bad values found while running (e.g. an impossible setting): one line too
        sys.stderr.write(f"lpm-llm: error: {type(e).__name__}: {_one_line(e)}\n")
        return 2
    except KeyboardInterrupt as e:
        how, status = ("terminated (SIGTERM)", 143) if isinstance(e, Terminated) else ("interrupted", 130)
        sys.stderr.write(f"lpm-llm: {how}; the partial run folder is kept with its manifest, the local model "
                         "was stopped\n")
        return status
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    sys.stdout.write(f"results in {result.out_dir}\n")
    return 0


def _terminate_on_sigterm():
    """Make SIGTERM raise :class:`Terminated` (once) in the main thread; returns the previous handler."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    fired = []

    def handler(signum: int, frame: object) -> None:
        if not fired:  # a second SIGTERM while cleaning up does not interrupt the cleanup
            fired.append(signum)
            raise Terminated("SIGTERM")

    return signal.signal(signal.SIGTERM, handler)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
