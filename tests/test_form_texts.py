"""The texts users read in Scipion: form help, citations and the Methods tab.

* every parameter our protocols and viewers define has a help text of at least
  ``MIN_HELP`` characters (pyworkflow's own run name, host, threads, … are not ours);
* no help, label, docstring, summary or Methods line uses internal wording
  (``FORBIDDEN``);
* every cited key is in ``scipion_gsplat/bibtex.py`` and renders, through
  pyworkflow's own ``_getCiteText`` and hypertext parser (what the Methods tab
  shows), as "Surname et al., journal, year" with no LaTeX left and no empty field;
* the Methods tab of finished runs (and the default run names of new runs) show
  no stray ``_``/``*``: Scipion's renderer reads ``_text_`` as italics and
  ``*text*`` as bold, so ``_scipion_gsplat - …_`` showed as "*scipion*gsplat …_".

No display is needed: the viewers' forms are built without opening them.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
import re

import pytest

MIN_HELP = 40
FORBIDDEN = re.compile(r"seed ?0\d|issue \d|TODO", re.IGNORECASE)
MARKUP_LEFT = re.compile(r"[_*]")
CITE_SHAPE = re.compile(r"(?P<author>[^,]+) et al\., (?P<journal>\S.*\S), (?P<year>\d{4})")


def _register_plugins():
    """Let pyworkflow find the plugin (package, bibtex), as the GUI does at start."""
    import pwem
    pwem.Domain.getProtocols()


def _classes(package_name: str, base) -> list:
    """Concrete classes deriving from ``base`` defined in the modules of a package."""
    pkg = importlib.import_module(package_name)
    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{package_name}.{info.name}")
        for name, obj in vars(mod).items():
            if (inspect.isclass(obj) and issubclass(obj, base) and obj.__module__ == mod.__name__
                    and "_label" in obj.__dict__):
                found[name] = obj
    return [found[k] for k in sorted(found)]


def protocol_classes() -> list:
    from pyworkflow.protocol import Protocol
    from pyworkflow.viewer import Viewer
    return [c for c in _classes("scipion_gsplat.protocols", Protocol) if not issubclass(c, Viewer)]


def viewer_classes() -> list:
    from pyworkflow.viewer import ProtocolViewer
    return _classes("scipion_gsplat.viewers", ProtocolViewer)


def _pyworkflow_param_names() -> set:
    """Names of the parameters pyworkflow adds to every protocol form by itself."""
    from pyworkflow.protocol import Protocol

    class _Bare(Protocol):
        def _defineParams(self, form):
            form.addSection(label="bare")
            form.addParallelSection(threads=1, mpi=1)

    return {name for name, _ in _Bare()._definition.iterAllParams()}


def _our_params(prot, exclude: set) -> list:
    """``(name, param)`` of the parameters a protocol or viewer defines itself."""
    return [(name, p) for name, p in prot._definition.iterAllParams() if name not in exclude]


def _text(value) -> str:
    """The string of a pyworkflow String (help, label) or a plain value ('' for None)."""
    value = value.get() if hasattr(value, "get") else value
    return str(value or "")


def render(line: str, links: list = None) -> str:
    """The text a Scipion text box shows for ``line``: what
    pyworkflow.gui.text.TaggedText.matchHyperText inserts for each match of
    pyworkflow's hypertext pattern (bold/italic/fixed: a space and the inner text;
    [[url][label]] links: the label). Link targets are appended to ``links``."""
    from pyworkflow.utils import (HYPER_BOLD, HYPER_FIXED, HYPER_ITALIC, HYPER_LINK1, HYPER_LINK2,
                                  parseHyperText)

    def shown(match, tag):
        if tag in (HYPER_BOLD, HYPER_ITALIC, HYPER_FIXED):
            return " " + match.group(tag)
        if tag == HYPER_LINK2:
            if links is not None:
                links.append(match.group(HYPER_LINK2))
            return match.group("link2_label")
        if tag == HYPER_LINK1 and links is not None:
            links.append(match.group(HYPER_LINK1))
        return match.group(tag)

    return parseHyperText(line, shown)


def cite_problems(text: str) -> list:
    """What is wrong with a citation as the Methods tab shows it ([] when fine)."""
    links = []
    shown = render(text, links).strip()
    problems = []
    if re.search(r"[\\{}\"]", shown):
        problems.append("LaTeX markup left (backslash, brace or quote accent)")
    if re.search(r",\s*,", shown):
        problems.append("an empty field")
    if not CITE_SHAPE.fullmatch(shown):
        problems.append("not 'Surname et al., journal, year'")
    problems += [f"link {link!r} is not a web address (the GUI would open it as a file)"
                 for link in links if not link.startswith("http")]
    return [f"{shown!r}: {p}" for p in problems]


def methods_tab_lines(prot) -> list:
    """The lines the project window's Methods tab shows for one selected run
    (pyworkflow.gui.project.viewprotocols.ProtocolsView._fillMethod)."""
    lines = ["*METHODS:*", "> _%s_" % prot.getRunName()] + list(prot.getParsedMethods()) + [""]
    cites = dict(prot.getCitations())
    cites.update(prot.getPackageCitations())
    if cites:
        lines.append("*REFERENCES:*")
        lines += list(cites.values())
    return lines


def markup_left(line: str) -> bool:
    """True when Scipion's renderer would leave a ``_`` or ``*`` visible in ``line``."""
    return bool(MARKUP_LEFT.search(render(line)))


# ---------------------------------------------------------------- checkers pinned
def test_checkers_catch_the_reported_artefacts():
    """The two artefacts of the report are found by the checks used below."""
    from pyworkflow.protocol import Protocol
    from pyworkflow.utils import parseBibTex
    # the old entry was in a plain docstring, where Dr\"ager had become Dr"ager
    old = parseBibTex('@techreport{Old, author = {Dr"ager, Nikolaus}, title = {T}, year = {2024}}')
    old_text = Protocol()._getCiteText(old["Old"])
    assert old_text == 'Dr"ager et al., , 2024'
    assert cite_problems(old_text)
    assert markup_left("> _scipion_gsplat - split volume classification_")
    assert not markup_left("> _gsplat - split volume classification_")


# ---------------------------------------------------------------- protocols
@pytest.mark.parametrize("cls", protocol_classes(), ids=lambda c: c.__name__)
def test_protocol_params_have_help(cls):
    standard = _pyworkflow_param_names()
    prot = cls()
    ours = _our_params(prot, standard)
    assert ours, f"{cls.__name__}: no parameters found"
    short = [f"{name} ({len(_text(p.help))} chars)" for name, p in ours if len(_text(p.help).strip()) < MIN_HELP]
    assert not short, f"{cls.__name__}: help missing or under {MIN_HELP} characters: {', '.join(short)}"


@pytest.mark.parametrize("cls", protocol_classes(), ids=lambda c: c.__name__)
def test_protocol_texts_have_no_internal_wording(cls):
    prot = cls()
    texts = {"docstring": cls.__doc__ or "", "class label": cls.getClassLabel()}
    for name, p in _our_params(prot, set()):
        texts[f"{name}.help"] = _text(p.help)
        texts[f"{name}.label"] = _text(p.label)
    bad = {k: FORBIDDEN.search(v).group() for k, v in texts.items() if FORBIDDEN.search(v)}
    assert not bad, f"{cls.__name__}: internal wording {bad}"


@pytest.mark.parametrize("cls", protocol_classes(), ids=lambda c: c.__name__)
def test_default_run_name_renders_in_italics(cls):
    """A new run is named getClassLabel() and shown as _name_ in Methods/Summary."""
    _register_plugins()
    line = "> _%s_" % cls.getClassLabel()
    assert not markup_left(line), f"{line!r} shows as {render(line)!r}"
    assert cls.getClassLabel().startswith("gsplat - ")


def test_citations_are_in_the_bibtex_and_render():
    _register_plugins()
    import scipion_gsplat
    from pyworkflow.utils import parseBibTex
    bib = parseBibTex(importlib.import_module("scipion_gsplat.bibtex").__doc__)
    assert dict(scipion_gsplat._bibtex) == bib   # what pyworkflow loaded is this file
    problems, cited = [], set()
    for cls in protocol_classes():
        prot = cls()
        keys = list(prot._citations() or []) + list(getattr(scipion_gsplat, "_references", []))
        cited.update(keys)
        missing = [k for k in keys if k not in bib]
        assert not missing, f"{cls.__name__}: cited keys not in bibtex.py: {missing}"
        rendered = dict(prot.getCitations())
        rendered.update(prot.getPackageCitations())
        problems += [f"{cls.__name__} {k}: {p}" for k, text in rendered.items() for p in cite_problems(text)]
    from pyworkflow.protocol import Protocol
    for key, entry in bib.items():   # also entries no protocol cites yet
        problems += [f"{key}: {p}" for p in cite_problems(Protocol()._getCiteText(entry))]
        if not entry.get("title", "").strip():
            problems.append(f"{key}: no title")
    assert not problems, "\n".join(problems)
    assert {"Lauzirika2024splitvolume", "Drager2024splat", "Chen2021gmm"} <= cited


# ---------------------------------------------------------------- finished runs
@pytest.mark.parametrize("key", ["split", "splat", "het", "pair"])
def test_methods_tab_of_finished_runs(in_gui_project, key):
    proj = in_gui_project["project"]
    prot = in_gui_project[key]
    methods = list(prot._methods() or [])
    assert methods and len(methods[0]) > 40, f"{key}: no Methods text: {methods}"
    lines = methods_tab_lines(prot)
    left = [f"{line!r} -> {render(line)!r}" for line in lines if markup_left(line)]
    assert not left, "markup shown as text:\n" + "\n".join(left)
    for line in list(prot.summary()) + methods:
        assert not FORBIDDEN.search(line), f"{key}: internal wording in {line!r}"
    if key != "pair":
        refs = [line for line in lines if "et al." in line]
        assert refs, f"{key}: no reference in the Methods tab"
        assert not [p for line in refs for p in cite_problems(line)]
    # the name a new run of the same protocol gets in this project
    fresh = proj.newProtocol(type(prot))
    assert not markup_left("> _%s_" % fresh.getRunName()), fresh.getRunName()


def test_viewer_params_have_help(in_gui_project):
    proj = in_gui_project["project"]
    runs = [in_gui_project[k] for k in ("split", "splat", "het")]
    checked, short = [], []
    for cls in viewer_classes():
        targets = tuple(getattr(cls, "_targets", []))
        prot = next((r for r in runs if isinstance(r, targets)), None)
        if prot is None:
            continue
        viewer = cls(project=proj, protocol=prot)
        standard = {name for name, _ in viewer._definition.iterAllParams()}
        viewer.setProtocol(prot)
        ours = _our_params(viewer, standard)
        assert ours, f"{cls.__name__}: no parameters"
        checked.append(cls.__name__)
        short += [f"{cls.__name__}.{name} ({len(_text(p.help))} chars)" for name, p in ours
                  if len(_text(p.help).strip()) < MIN_HELP]
        short += [f"{cls.__name__}.{name}: internal wording" for name, p in ours
                  if FORBIDDEN.search(_text(p.help) + " " + _text(p.label))]
    assert len(checked) >= 3, checked
    assert not short, f"viewer help missing or under {MIN_HELP} characters: {', '.join(short)}"
