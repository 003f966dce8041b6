"""``lpm-llm``: run or calibrate an experiment from a YAML file.

    lpm-llm run experiments/covid_nyc.yaml [--out DIR] [--set key.path=value ...] [--quiet]
    lpm-llm calibrate experiments/covid_nyc.yaml [--out DIR] [--set ...]
    lpm-llm list                      # the bundled experiments, archetypes and prompts

Expected failures (a bad config, a missing API key, an unreachable endpoint, a missing extra) end
with one line on stderr saying what to do, and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

_EPILOG = "Example: lpm-llm run experiments/covid_nyc.yaml --set days=30 --set llm.concurrency=2"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lpm-llm", description="Large Population Models with LLM archetypes.",
                                epilog=_EPILOG)
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (("run", "run an experiment (all scenarios and seeds)"),
                       ("calibrate", "calibrate an experiment's parameters to the bundled NYC data")):
        s = sub.add_parser(name, help=text, description=text, epilog=_EPILOG)
        s.add_argument("experiment", help="experiment YAML (a path, or the name of a bundled one)")
        s.add_argument("--out", help="output folder (default: runs/NAME-TIMESTAMP)")
        s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set population.scale=0.02 (repeatable)")
        s.add_argument("--quiet", "-q", action="store_true", help="no progress bars; warnings only")
        s.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    sub.add_parser("list", help="list the bundled experiments, archetypes and prompts")
    return p


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

    try:
        exp = Experiment.from_yaml(args.experiment, args.overrides, progress=_progress_factory(args.quiet))
        result = exp.run(args.out) if args.command == "run" else exp.calibrate(args.out)
    except (ConfigError, LLMError, FileNotFoundError) as e:
        sys.stderr.write(f"lpm-llm: error: {e}\n")
        return 2
    except ValueError as e:  # bad values found while running (e.g. an impossible setting): one line too
        sys.stderr.write(f"lpm-llm: error: {type(e).__name__}: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("lpm-llm: interrupted; the partial run folder is kept, the local model was stopped\n")
        return 130
    sys.stdout.write(f"results in {result.out_dir}\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
