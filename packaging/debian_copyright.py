"""Write the package's /usr/share/doc/voxgate/copyright (Debian copyright-format 1.0).

    python debian_copyright.py ROOT PREFIX PYPROJECT MAINTAINER > copyright

Run by build-deb.sh with the staged virtualenv's interpreter, so that
``importlib.metadata`` sees exactly the distributions the package bundles. One
paragraph per distribution names its installed files, the copyright lines of
its licence files and its licence (``License-Expression``, else ``License``,
else the trove classifiers), and points at the licence texts that ship in its
``.dist-info`` directory (and in /usr/share/common-licenses where Debian has
them). voxgate itself is under the licence pyproject.toml's ``[project]
license`` names; without one, no licence is granted.
"""

from __future__ import annotations

import re
import sys
import tomllib
from collections.abc import Iterable, Iterator
from importlib.metadata import Distribution, distributions
from pathlib import Path, PurePosixPath

FORMAT = "https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/"
COMMON_LICENSES = Path("/usr/share/common-licenses")
# "Copyright (c) 2016 Someone", "(C) 2002-2017 ...": a notice with a year, not licence prose.
_COPYRIGHT_LINE = re.compile(r"^\s*(copyright|\(c\)|©)\b.*\b(19|20)\d\d\b", re.IGNORECASE)
_MAX_COPYRIGHT_LINES = 12
_CLASSIFIER_PREFIX = "License :: "


def field(name: str, value: str) -> str:
    """A DEP-5 field: the first line after the name, the rest as continuation lines
    (a blank line becomes `` .``)."""
    first, *rest = value.strip().splitlines() or [""]
    lines = [f"{name}: {first.strip()}"]
    lines += [f" {line.rstrip()}" if line.strip() else " ." for line in rest]
    return "\n".join(lines)


def meta(dist: Distribution, key: str) -> str:
    """The first value of a core-metadata field, or ``""``."""
    values = dist.metadata.get_all(key) or [""]
    return str(values[0])


def short_name(dist: Distribution) -> str:
    """The licence as a DEP-5 short name (SPDX-like, no spaces inside a name)."""
    expression = meta(dist, "License-Expression")
    declared = meta(dist, "License")
    if not expression and declared and "\n" not in declared.strip() and len(declared) < 60:
        expression = declared
    if not expression:
        classifiers = dist.metadata.get_all("Classifier") or []
        names = [c.removeprefix(_CLASSIFIER_PREFIX).split(" :: ")[-1]
                 for c in classifiers if c.startswith(_CLASSIFIER_PREFIX)]
        expression = " or ".join(names) or "unknown"
    # "MIT OR Apache-2.0" (SPDX) is "MIT or Apache-2.0" in DEP-5; names lose spaces.
    parts = re.split(r"\s+(AND|OR|and|or|WITH|with)\s+", expression.strip())
    return " ".join(p.lower() if i % 2 else re.sub(r"\s+", "-", p) for i, p in enumerate(parts))


def licence_files(dist: Distribution, site: Path) -> list[Path]:
    """The licence files the distribution installed (absolute staged paths)."""
    names = {PurePosixPath(name).name for name in dist.metadata.get_all("License-File") or []}
    found = []
    for entry in dist.files or ():
        path = Path(str(entry))
        in_dist_info = path.parts[0].endswith(".dist-info")
        if in_dist_info and (path.name in names or "licenses" in path.parts
                             or path.name.upper().startswith(("LICEN", "COPYING", "NOTICE"))):
            found.append((site / path).resolve())
    return sorted(found)


def copyright_lines(files: Iterable[Path], fallback: str) -> str:
    """The distinct copyright notices of the licence files, else ``fallback``."""
    seen: dict[str, None] = {}
    for path in files:
        for line in path.read_text(errors="replace").splitlines():
            if _COPYRIGHT_LINE.match(line) and len(line) < 200:
                seen.setdefault(" ".join(line.split()), None)
    notices = list(seen)[:_MAX_COPYRIGHT_LINES]
    return "\n".join(notices) if notices else fallback


def installed_patterns(dist: Distribution, site: Path, root: Path) -> list[str]:
    """``Files:`` patterns (paths in the package) covering what the distribution installed."""
    patterns = set()
    for entry in dist.files or ():
        path = (site / str(entry)).resolve()
        if path.is_relative_to(site):  # a top-level package, module or .dist-info
            top = site / path.relative_to(site).parts[0]
            patterns.add(f"{top.relative_to(root)}/*" if top.is_dir() else
                         str(top.relative_to(root)))
        else:  # a script in bin/
            patterns.add(str(path.relative_to(root)))
    return sorted(patterns)


def paragraphs(root: Path, prefix: str, pyproject: Path, maintainer: str) -> Iterator[str]:
    """The copyright file's paragraphs, header first."""
    with pyproject.open("rb") as f:
        project = tomllib.load(f)["project"]
    venv = root / prefix.lstrip("/")
    (site,) = venv.glob("lib/python3*/site-packages")
    yield "\n".join((
        field("Format", FORMAT),
        field("Upstream-Name", project["name"]),
        field("Upstream-Contact", maintainer),
        field("Comment",
              f"voxgate runs in a Python virtual environment in {prefix} that bundles\n"
              "the Python distributions listed below, each under its own licence. Their\n"
              "licence texts ship in the .dist-info directories named."),
    ))
    own = project.get("license")
    own_text = own.get("text") if isinstance(own, dict) else own
    yield "\n".join((
        field("Files", "*"),
        field("Copyright", f"the {project['name']} authors ({maintainer})"),
        field("License", f"{own_text}\nSee the voxgate sources." if own_text else
              "UNLICENSED\nNo licence is granted for voxgate itself: all rights are reserved\n"
              "by its authors."),
    ))
    own_name = project["name"]
    for dist in sorted(distributions(path=[str(site)]), key=lambda d: d.metadata["Name"].lower()):
        name = dist.metadata["Name"]
        if name == own_name:
            continue
        texts = licence_files(dist, site)
        licence = short_name(dist)
        authors = meta(dist, "Author") or meta(dist, "Author-email")
        notes = [f"{name} {dist.version}."]
        notes += [f"Licence text: {PurePosixPath('/', p.relative_to(root))}" for p in texts]
        notes += [f"On Debian systems the full text of {token} is in {COMMON_LICENSES / token}."
                  for token in sorted(set(re.findall(r"[\w.+-]+", licence)))
                  if (COMMON_LICENSES / token).is_file()]
        if not texts:
            notes.append("The distribution ships no licence file; see its project page, "
                         f"{meta(dist, 'Home-page') or 'on PyPI'}.")
        yield "\n".join((
            field("Files", "\n".join(installed_patterns(dist, site, root))),
            field("Copyright", copyright_lines(
                texts, f"the {name} authors" + (f" ({authors})" if authors else ""))),
            field("License", licence + "\n" + "\n".join(notes)),
        ))


def main(argv: list[str]) -> int:
    """Print the copyright file for the staged package ROOT."""
    root, prefix, pyproject, maintainer = argv
    print("\n\n".join(paragraphs(Path(root).resolve(), prefix, Path(pyproject), maintainer)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
