"""Make the golden files that pin ICD's metrics to the official evaluation tools.

Run once, by hand, with the official tools at hand; the tests read only the files it writes
(``vqa_accuracy.json.gz``, ``caption_metrics.json.gz`` beside this script):

    .venv/bin/python tests/golden/make_goldens.py \\
        --vqa-eval PATH/TO/GT-Vision-Lab/VQA/PythonEvaluationTools/vqaEvaluation/vqaEval.py \\
        --lmms-eval PATH/TO/EvolvingLMMs-Lab/lmms-eval

- **VQA**: every case is scored by the official ``VQAEval.evaluate`` (GT-Vision-Lab/VQA,
  run under Python 3: its two Python 2 ``print`` statements are rewritten to calls, and its
  per-question score is read before its rounding to two decimals), and by lmms-eval's
  ``vqav2_process_results`` and ``textvqa_process_results`` (the latter is also OK-VQA's and
  VizWiz's scoring), each function taken from the lmms-eval source as it is. Answers carry
  an ``answer_id`` as in the VQA annotation files (the official tools tell the ten
  annotators apart by comparing the answer dicts). ``official_always`` is the official
  tool's own ``processPunctuation`` + ``processDigitArticle`` applied to every answer, i.e.
  the official evaluation without its skip of normalisation when all reference answers are
  identical — the rule ICD follows. With a single reference answer the official tools score
  every prediction 0 (the one leave-one-out subset is empty); there ``official_always`` is
  the exact match of the officially processed answers, ICD's rule for single-answer data.
- **Captions**: each set (a small corpus of images, one candidate caption and 1–5
  references each) is tokenised by pycocoevalcap's ``PTBTokenizer`` (Stanford CoreNLP
  3.4.1's PTBTokenizer through Java, punctuation tokens removed) and scored by its
  ``Bleu(4)`` and ``Cider`` (CIDEr-D), as ``COCOEvalCap.evaluate`` does. The tokenised
  form of every caption is stored too.

Nothing of the official code is kept in the repository: only these outputs.
``pycocoevalcap`` comes from PyPI (it is a dependency already); the VQA and lmms-eval files
from their GitHub repositories (the commits used are recorded in the golden files).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import gzip
import io
import json
import random
import re
import statistics
import subprocess
import types
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------- loaders


def load_official_vqa_eval(path: Path) -> type:
    """The official ``VQAEval`` class, its Python 2 prints rewritten as calls."""
    src = path.read_text()
    src = re.sub(r"^(\s*)print (\".*\")\s*$", r"\1print(\2)", src, flags=re.M)
    module = types.ModuleType("vqaEval")
    exec(compile(src, str(path), "exec"), module.__dict__)
    return module.VQAEval


def _function_from(path: Path, name: str, namespace: dict[str, Any]) -> Any:
    tree = ast.parse(path.read_text())
    (fn,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(path), "exec"), namespace)
    return namespace[name]


def load_lmms_eval(root: Path) -> tuple[Any, Any, Any]:
    """lmms-eval's ``EvalAIAnswerProcessor``, ``vqav2_process_results`` and
    ``textvqa_process_results`` (the functions as they are; their modules' other imports,
    for logging and submission files, are not needed)."""
    tasks = root / "lmms_eval" / "tasks"
    module = types.ModuleType("vqa_eval_metric")
    src = (tasks / "_task_utils" / "vqa_eval_metric.py").read_text()
    exec(compile(src, "vqa_eval_metric.py", "exec"), module.__dict__)
    ns: dict[str, Any] = {
        "EvalAIAnswerProcessor": module.EvalAIAnswerProcessor,
        "statistics": statistics,
    }
    vqav2 = _function_from(tasks / "vqav2" / "utils.py", "vqav2_process_results", dict(ns))
    textvqa = _function_from(tasks / "textvqa" / "utils.py", "textvqa_process_results", dict(ns))
    return module.EvalAIAnswerProcessor, vqav2, textvqa


# ------------------------------------------------------------------------------ VQA cases

GROUPS: dict[str, list[list[str]]] = {
    # each inner list: surface forms of one answer (some equal after the official
    # processing, some not); cases draw references and predictions from a group
    "punctuation": [
        ["yes", "Yes", "yes.", "Yes!", "yes?", "YES", "yes!!", "(yes)", "yes;", '"yes"', "'yes'"],
        ["no", "No.", "no!", "no,", "No", "nO", "no...", "no?", "no .", "[no]"],
        ["t-shirt", "t shirt", "tshirt", "T-Shirt", "t - shirt", "t-shirt.", "T-shirt!"],
        ["hot dog", "hotdog", "hot-dog", "hot dogs", "hot_dog", "hot/dog", "Hot Dog."],
        ["left", "left.", "left/right", "left / right", "left or right", "right", "left,right"],
        ["1/2", "1 / 2", "half", "1-2", "1/2.", "one half", "0.5", ".5", "0.50"],
        ["red and white", "red, white", "red,white", "red/white", "red & white", "white and red"],
        ["e-mail", "email", "e mail", "e-mail.", "E-Mail", "@email", "e_mail"],
        ["a.m.", "am", "a m", "AM", "a.m", "A.M.", "morning"],
        ["u.s.", "US", "U.S.", "U.S.A.", "usa", "USA", "us", "u.s.a", "u. s."],
        ["st. louis", "st louis", "St. Louis", "saint louis", "st.louis"],
        ["mr. smith", "mr smith", "Mr. Smith", "smith", "mr.smith"],
        ["2.5", "2.5.", "2,5", "2 .5", "25", "2.50", "two and half"],
        ["...", ".", "?", "!", "-", "--", "", " ", ";", "()", "[]"],
        ["c++", "c", "C#", "c ++", "c+ +", "c plus plus"],
        ["<3", "3", "heart", "< 3", "<3!", "=3"],
        ["k9", "k-9", "K 9", "k nine", "k-nine"],
        ["wi-fi", "wifi", "wi fi", "Wi-Fi", "WiFi."],
        ["x-ray", "xray", "x ray", "X-Ray", "x-rays"],
        ["3:30", "330", "3 30", "3.30", "3:30.", "three thirty"],
        ["50%", "50 %", "50", "50 percent", "fifty percent", "%50"],
        ["#1", "1", "number 1", "no. 1", "#1.", "no 1", "number one"],
        ["a&w", "a & w", "aw", "a and w", "A&W", "a&w."],
        ["back\\slash", "back slash", "backslash", "back/slash", "back\\ slash"],
    ],
    "contractions": [
        ["dont", "don't", "Dont", "do not", "don't.", "DONT", "don`t", "don\u2019t"],
        ["cant", "can't", "cannot", "can not", "Can't!", "cant."],
        ["its", "it's", "it is", "It's", "its.", "it s"],
        ["im", "I'm", "Im", "i'm", "I am", "i m"],
        ["whats", "what's", "what is", "Whats?", "what's."],
        ["oclock", "o'clock", "3 oclock", "3 o'clock", "3 o clock", "3:00", "3"],
        ["lets", "let's", "let us", "Let's", "lets go", "let's go"],
        ["yall", "y'all", "you all", "Yall", "y all"],
        ["wont", "won't", "will not", "Won't.", "wont!"],
        ["theyre", "they're", "they are", "their", "there", "theyre."],
        ["mans", "man's", "man", "men", "men's", "mens", "man 's"],
        ["maam", "ma'am", "madam", "Ma'am.", "ma am"],
        ["shouldnt've", "shouldn't've", "shouldntve", "shouldn'tve", "should not have"],
        ["somebody'd", "somebodyd", "somebody would", "somebody'd've"],
        ["isnt", "isn't", "is not", "Isn't", "isnt.", "ain't", "aint"],
        ["twas", "'twas", "it was", "Twas"],
    ],
    "numbers": [
        ["2", "two", "Two", "2.", "TWO", "two!", "the two", "2 ", "second", "to", "too"],
        ["none", "0", "zero", "None.", "nothing", "no one", "0.", "NONE", "nil", "no"],
        ["1", "one", "One", "a one", "won", "1.", "1st", "first", "an one"],
        ["10", "ten", "Ten", "10.", "tens", "10s", "ten!"],
        ["11", "eleven", "Eleven", "11.", "1 1"],
        ["3", "three", "Three", "3.", "the three", "three 3", "3 3"],
        ["1000", "1,000", "1 000", "one thousand", "1.000", "1k", "1,000."],
        ["100", "one hundred", "hundred", "a hundred", "100.", "1 hundred"],
        ["7", "seven", "Seven!", "7 ", " seven", "seven.", "7th"],
        ["12", "twelve", "one two", "1 2", "12.", "1-2", "1,2"],
        ["1,5", "1, 5", "15", "1 5", "one five", "1.5", "1,,5"],
        ["4 and 5", "four and five", "4, 5", "4,5", "45", "4-5", "four five"],
    ],
    "articles": [
        ["dog", "a dog", "the dog", "The dog", "A Dog", "an dog", "dogs", "the dogs"],
        ["apple", "an apple", "the apple", "An Apple.", "a apple", "apples"],
        ["the", "a", "an", "The", "A.", "", "an the", "the a"],
        ["cat in hat", "the cat in the hat", "cat in a hat", "a cat in hat", "cat hat"],
        ["man", "the man", "a man", "The Man!", "man.", "a man.", "woman"],
        ["beatles", "the beatles", "The Beatles", "beatle", "the beetles"],
        ["a lot", "lot", "lots", "alot", "a lot.", "the lot"],
        ["anna", "an na", "ana", "an a", "Anna"],
    ],
    "money": [
        ["$5", "5", "5 dollars", "$5.00", "five dollars", "$ 5", "5$", "$5.", "5.00"],
        ["$1,000", "1000", "$1000", "1,000", "1,000 dollars", "$ 1,000", "$1k"],
        ["\u20ac10", "10", "10 euros", "\u20ac 10", "10\u20ac", "ten euros", "$10"],
        ["\u00a320", "20", "20 pounds", "\u00a3 20", "twenty pounds", "20.00"],
        ["$0.99", "0.99", ".99", "99 cents", "$.99", "99", "$0.99."],
        ["2 cents", "2", "$0.02", "two cents", "2c", "2\u00a2"],
        ["free", "0", "$0", "none", "nothing", "zero", "$0.00"],
    ],
    "times": [
        ["3:00", "3", "3 o'clock", "3:00 pm", "3pm", "3 p.m.", "3 pm", "3:00.", "15:00"],
        ["noon", "12:00", "12", "12 pm", "12:00 pm", "midday", "12 noon"],
        ["10:10", "10 10", "1010", "10:10 am", "10:10am", "10.10", "ten ten"],
        ["morning", "am", "a.m.", "in morning", "the morning", "early morning"],
        ["1:45", "145", "1 45", "quarter to 2", "1:45 pm", "1:45."],
        ["night", "nighttime", "night time", "night-time", "at night", "evening"],
        ["2017", "2,017", "2 017", "twenty seventeen", "'17", "2017."],
        ["5 minutes", "5 min", "5", "five minutes", "5 mins", "5min", "5 minutes."],
    ],
    "unicode": [
        ["caf\u00e9", "cafe", "CAF\u00c9", "caf\u00e9.", "cafe\u0301", "caf\u00e8"],
        ["na\u00efve", "naive", "Na\u00efve", "na\u00efve!", "naive."],
        ["stra\u00dfe", "strasse", "STRASSE", "Stra\u00dfe", "stra\u00dfe."],
        ["\uff59\uff45\uff53", "yes", "\uff39\uff25\uff33", "yes\u200b", "y\u00e9s", "yes\u00a0"],
        ["\u201cyes\u201d", '"yes"', "yes", "\u2018yes\u2019", "\u00abyes\u00bb", "yes\u3002"],
        ["no\u2014way", "no way", "no-way", "no\u2013way", "noway", "no \u2014 way"],
        ["\u0661\u0662", "12", "\u0661,\u0662", "\u0661\u0662.", "twelve"],
        ["\u0130stanbul", "istanbul", "Istanbul", "\u0131stanbul", "ISTANBUL"],
        ["\u65e5\u672c", "japan", "\u65e5\u672c\u3002", "\u65e5 \u672c", "\u65e5\u672c."],
        ["\u00bd", "1/2", "half", "0.5", "\u00bd.", "one half"],
        ["\u2153", "1/3", "third", "one third", "0.33"],
        ["\u00b0c", "c", "degrees", "\u00b0", "celsius", "\u2103"],
        ["\U0001f600", "smile", ":)", "\U0001f600.", "smiley", ""],
    ],
    "whitespace": [
        ["yes", " yes", "yes ", "yes\n", "\tyes", "ye s", "y es", "yes\t\n", "\n"],
        ["hot dog", "hot  dog", "hot\tdog", "hot\ndog", " hot dog ", "hotdog", "hot dog\n"],
        ["", " ", "\n", "\t", "  ", ".", "\u00a0"],
    ],
}


def _official_acc(vqa_eval_cls: type, refs: list[str], pred: str) -> float:
    gts = {
        1: {
            "answers": [
                {"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                for i, a in enumerate(refs)
            ],
            "question_type": "what",
            "answer_type": "other",
        }
    }
    res = {1: {"answer": pred, "question_id": 1}}
    vqa = types.SimpleNamespace(qa=gts, getQuesIds=lambda: [1])
    vqa_res = types.SimpleNamespace(qa=res)
    raw: dict[int, float] = {}

    class Eval(vqa_eval_cls):  # type: ignore[misc,valid-type]
        def setEvalQA(self, quesId: int, acc: float) -> None:  # noqa: N802, N803
            raw[quesId] = acc  # the unrounded per-question accuracy

    with contextlib.redirect_stdout(io.StringIO()):
        Eval(vqa, vqa_res).evaluate()
    return raw[1]


def _official_always(vqa_eval_cls: type, refs: list[str], pred: str) -> float:
    """The official processing (its own two functions) applied to every answer."""
    tool = vqa_eval_cls(types.SimpleNamespace(getQuesIds=lambda: []), None)

    def norm(s: str) -> str:
        s = s.replace("\n", " ").replace("\t", " ").strip()
        return tool.processDigitArticle(tool.processPunctuation(s))

    gts = [norm(a) for a in refs]
    p = norm(pred)
    if len(gts) == 1:  # no leave-one-out subset has an answer left: exact match instead
        return float(gts[0] == p)
    acc = [
        min(1, float(sum(g == p for j, g in enumerate(gts) if j != i)) / 3) for i in range(len(gts))
    ]
    return float(sum(acc)) / len(acc)


def _lmms_vqav2(fn: Any, refs: list[str], pred: str) -> float:
    doc = {
        "question_id": 1,
        "answers": [
            {"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
            for i, a in enumerate(refs)
        ],
    }
    return float(fn(doc, [pred])["exact_match"])


def _lmms_textvqa(fn: Any, refs: list[str], pred: str) -> float:
    return float(fn({"question_id": 1, "answers": list(refs)}, [pred])["exact_match"])


def _mutate(rng: random.Random, s: str) -> str:
    """A random edit of an answer: punctuation, case, spacing, digits and words."""
    pieces = list(".,;:!?/\\-_()[]{}\"'`@#$%&*+=<>~^|") + [
        " ",
        "  ",
        "\u00a0",
        "\u2019",
        "\u2014",
        "\u00e9",
        "1",
        "0",
        "5",
        ",0",
        ".5",
        " a ",
        " the ",
        "an ",
        "one",
        "two",
        "none",
        "dont",
        "n't",
        "'s",
        "...",
        ",,",
        "\n",
        "\t",
    ]
    out = s
    for _ in range(rng.randint(1, 3)):
        op = rng.random()
        pos = rng.randint(0, len(out))
        if op < 0.5:
            out = out[:pos] + rng.choice(pieces) + out[pos:]
        elif op < 0.7 and out:
            out = out[:pos] + out[pos + 1 :]
        elif op < 0.85:
            out = out.upper() if rng.random() < 0.5 else out.capitalize()
        else:
            out = out + rng.choice([".", "!", "?", " .", ".."])
    return out


def vqa_cases(rng: random.Random, total: int) -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = []
    names = sorted(GROUPS)
    all_forms = [f for g in GROUPS.values() for forms in g for f in forms]

    def n_refs() -> int:
        r = rng.random()
        return 10 if r < 0.7 else rng.randint(2, 9) if r < 0.95 else 1

    while len(cases) < total:
        kind = rng.random()
        category = rng.choice(names)
        forms = rng.choice(GROUPS[category])
        n = n_refs()
        if kind < 0.08:  # all references identical: the official tool does not normalise
            ref = rng.choice(forms)
            refs = [ref] * n
            pred = rng.choice(forms)
            category = "identical_refs"
        elif kind < 0.22:  # fuzz: random edits of the group's forms
            base = rng.choice(forms)
            refs = [
                _mutate(rng, base) if rng.random() < 0.5 else rng.choice(forms) for _ in range(n)
            ]
            pred = _mutate(rng, rng.choice(forms)) if rng.random() < 0.7 else rng.choice(refs)
            category = "fuzz"
        else:
            # references: a mix of a few forms (duplicates are the usual case), a stranger
            k = rng.randint(1, 4)
            chosen = rng.sample(forms, min(k, len(forms)))
            weights = [rng.random() + 0.1 for _ in chosen]
            refs = rng.choices(chosen, weights=weights, k=n)
            if rng.random() < 0.2:
                refs[rng.randrange(n)] = rng.choice(all_forms)
            pred = rng.choice(forms) if rng.random() < 0.85 else rng.choice(all_forms)
        cases.append({"category": category, "pred": pred, "answers": refs})
    return cases


# -------------------------------------------------------------------------- caption sets

SUBJECTS = [
    "a man",
    "A woman",
    "two dogs",
    "the cat",
    "a t-shirt-wearing boy",
    "an old man's dog",
    "three people",
    "a group of 5 kids",
    "a U.S. soldier",
    "Mr. Smith",
    "a 2.5-year-old girl",
    "the children's toys",
    "a black-and-white photo",
    "an e-mail",
    'a "hot dog" stand',
    "someone",
    "it",
    "a 50% off sign",
    "the $5 bill",
    "an x-ray",
    "a pair of 1/2 cup measures",
    "a caf\u00e9",
    "the na\u00efve robot",
    "a \u201cstop\u201d sign",
    "two men \u2014 one tall",
    "a woman (in red)",
    "a [blurry] picture",
    "a {weird} shape",
    "dogs & cats",
    "the U.K. flag",
]
VERBS = [
    "is sitting on",
    "rides",
    "stands next to",
    "looks at",
    "isn't near",
    "can't reach",
    "holds",
    "is eating",
    "walks past",
    "jumps over",
    "plays with",
    "won't leave",
    "is in front of",
    "lies under",
    "points at",
    "waits by",
    "was at",
    "'s near",
]
OBJECTS = [
    "a bench",
    "the table.",
    "a red bike!",
    "a bus at 3:30 p.m.",
    'a sign that says "STOP"',
    "the St. Louis arch",
    "a 10-foot wall",
    "some pizza; it's hot",
    "a dog, a cat, and a bird",
    "the T.V.",
    "an umbrella...",
    "a bowl of fruit (apples, oranges)",
    "the grass?",
    "1,000 birds",
    "a $3.99 sandwich",
    "the 1950's car",
    "a man's hat",
    "the kids' toys",
    "a tennis racket --",
    "a sign reading 'no parking'",
    "a vase w/ flowers",
    "a laptop & mouse",
    "the #1 fan",
    "an A/C unit",
    "a 4x4 truck",
    "an e.g. example",
    "a 5'10\" man",
    "a yellow/green kite",
    "snow-covered trees",
    "the sea",
    "a clock showing 10:10",
    "a plate of fish & chips",
    "the 2nd floor",
    "a 24/7 store",
    "the colour grey",
    "a mother-in-law",
    "a well-known place",
    "a crowd :)",
    "a half-eaten donut",
    "etc.",
    "a path \u2026 in the woods",
]
TAILS = ["", ".", " .", "!", "?", " in the rain.", ", outside.", " -- again", " (again)", "..."]


def _caption(rng: random.Random) -> str:
    text = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(TAILS)}"
    r = rng.random()
    if r < 0.1:
        text = text.upper()
    elif r < 0.3:
        text = text[0].upper() + text[1:]
    if rng.random() < 0.05:
        text = text.replace(" ", "  ", 1)
    if rng.random() < 0.03:
        text = text + "\n"
    return text


def caption_sets(rng: random.Random, total: int) -> list[list[dict[str, Any]]]:
    sets = []
    for _ in range(total):
        images = []
        for _ in range(rng.randint(1, 8)):
            refs = [_caption(rng) for _ in range(rng.randint(1, 5))]
            r = rng.random()
            if r < 0.3:
                pred = rng.choice(refs)  # identical to a reference
            elif r < 0.45:  # a reference with its punctuation stripped or doubled
                pred = re.sub(r"[^\w\s]", "", rng.choice(refs))
            elif r < 0.5:
                pred = rng.choice(["", "a", "the", "...", "a man."])
            else:
                pred = _caption(rng)
            images.append({"pred": pred, "refs": refs})
        sets.append(images)
    return sets


def score_caption_set(images: list[dict[str, Any]]) -> dict[str, Any]:
    """pycocoevalcap as ``COCOEvalCap.evaluate`` runs it: PTB-tokenise, Bleu(4), Cider."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts = {i: [{"caption": r} for r in im["refs"]] for i, im in enumerate(images)}
    res = {i: [{"caption": im["pred"]}] for i, im in enumerate(images)}
    tok = PTBTokenizer()
    with contextlib.redirect_stdout(io.StringIO()):
        gts_t = tok.tokenize(gts)
        res_t = tok.tokenize(res)
        bleu, _ = Bleu(4).compute_score(gts_t, res_t, verbose=0)
        cider, _ = Cider().compute_score(gts_t, res_t)
    return {
        "images": [
            {**im, "pred_tokens": res_t[i][0], "ref_tokens": gts_t[i]}
            for i, im in enumerate(images)
        ],
        "bleu": [float(b) for b in bleu],
        "cider": float(cider),
    }


# ---------------------------------------------------------------------------------- main


def _dump(path: Path, payload: dict[str, Any]) -> None:
    data = json.dumps(payload, ensure_ascii=False, indent=0, sort_keys=True).encode()
    with gzip.GzipFile(path, "wb", mtime=0) as f:  # byte-stable output
        f.write(data)
    print(f"wrote {path} ({path.stat().st_size:,} bytes)")


def _git_commit(path: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True
        )
    except OSError:
        return None
    return out.stdout.strip() or None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--vqa-eval", type=Path, required=True, help="GT-Vision-Lab/VQA's vqaEval.py")
    ap.add_argument("--lmms-eval", type=Path, required=True, help="an lmms-eval checkout")
    ap.add_argument("--vqa-commit", default=None, help="the VQA repository's commit")
    ap.add_argument("--lmms-commit", default=None, help="the lmms-eval commit")
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--vqa-cases", type=int, default=3000)
    ap.add_argument("--caption-sets", type=int, default=300)
    ap.add_argument("--seed", type=int, default=34)
    ap.add_argument("--only", choices=["vqa", "captions"], default=None)
    args = ap.parse_args()

    if args.only in (None, "vqa"):
        vqa_eval_cls = load_official_vqa_eval(args.vqa_eval)
        _, vqav2, textvqa = load_lmms_eval(args.lmms_eval)
        cases = vqa_cases(random.Random(args.seed), args.vqa_cases)
        for c in cases:
            refs, pred = c["answers"], c["pred"]
            c["official"] = _official_acc(vqa_eval_cls, refs, pred)
            c["official_always"] = _official_always(vqa_eval_cls, refs, pred)
            c["lmms_vqav2"] = _lmms_vqav2(vqav2, refs, pred)
            c["lmms_textvqa"] = _lmms_textvqa(textvqa, refs, pred)
        _dump(
            args.out / "vqa_accuracy.json.gz",
            {
                "source": {
                    "vqaEval": "GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py",
                    "vqa_commit": args.vqa_commit or _git_commit(args.vqa_eval.parent),
                    "lmms_eval": "EvolvingLMMs-Lab/lmms-eval lmms_eval/tasks/{vqav2,textvqa}/utils.py",
                    "lmms_commit": args.lmms_commit or _git_commit(args.lmms_eval),
                    "seed": args.seed,
                },
                "cases": cases,
            },
        )
    if args.only in (None, "captions"):
        import importlib.metadata

        sets = caption_sets(random.Random(args.seed + 1), args.caption_sets)
        scored = [score_caption_set(s) for s in sets]
        java = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr
        _dump(
            args.out / "caption_metrics.json.gz",
            {
                "source": {
                    "pycocoevalcap": importlib.metadata.version("pycocoevalcap"),
                    "tokenizer": "stanford-corenlp-3.4.1.jar PTBTokenizer -preserveLines -lowerCase",
                    "java": java.splitlines()[0] if java else None,
                    "seed": args.seed + 1,
                },
                "sets": scored,
            },
        )


if __name__ == "__main__":
    main()
