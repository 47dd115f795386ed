"""Generate one API reference page per module of ``study/``, ``trainables/`` and ``search_spaces/`` (mkdocstrings
renders each from its docstrings, read statically), and the literate-nav ``SUMMARY.md`` that lists them: a new
module appears in the docs without anyone writing a line."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mkdocs_gen_files  # noqa: E402
from _lib import ROOT, first_paragraph, module_doc, prose  # noqa: E402

PACKAGES = ("study", "trainables", "search_spaces")


def main() -> None:
    nav = mkdocs_gen_files.Nav()
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if any(p.startswith("_") and p != "__init__" for p in parts):
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
                doc_path = Path(*parts, "index.md")
            else:
                doc_path = Path(*parts).with_suffix(".md")
            name = ".".join(parts)
            nav[tuple(parts)] = doc_path.as_posix()
            with mkdocs_gen_files.open(Path("reference", "api", doc_path), "w") as f:
                f.write(f"# `{name}`\n\n::: {name}\n")
                if path.name == "__init__.py":
                    children = sorted(p for p in path.parent.iterdir()
                                      if (p.suffix == ".py" and not p.name.startswith("_"))
                                      or (p.is_dir() and (p / "__init__.py").is_file()))
                    if children:
                        f.write("\n## Modules\n\n")
                        for child in children:
                            link = f"{child.name}/index.md" if child.is_dir() else f"{child.stem}.md"
                            doc = module_doc(child / "__init__.py" if child.is_dir() else child)
                            f.write(f"- [`{name}.{child.stem if child.suffix else child.name}`]({link}): "
                                    f"{prose(first_paragraph(doc))}\n")
    with mkdocs_gen_files.open("reference/api/SUMMARY.md", "w") as f:
        f.writelines(nav.build_literate_nav())


main()
