"""lm-eval's IFEval checker, offline: hand-written responses that obey or break real instructions (ids and kwargs
as in the IFEval data) score as expected, strict and loose, with no network.

The checker runs in one subprocess: importing lm_eval.tasks.ifeval looks for punkt_tab and tries a download when
it is missing, so use_offline_nltk must come first, in an interpreter where nltk is not imported yet."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

NO_NETWORK = """
import socket
def _refuse(*args, **kwargs):
    raise OSError("network access blocked by the test")
socket.socket.connect = socket.socket.connect_ex = socket.create_connection = _refuse
"""

_CHECKER = r"""
import json, sys
from pathlib import Path
assert "nltk" not in sys.modules
from dropquant.evaluation.nltk_data import use_offline_nltk
use_offline_nltk(Path(sys.argv[1]))
import langdetect
langdetect.DetectorFactory.seed = 0  # langdetect samples at random: the same verdict on every run
from lm_eval.tasks.ifeval import utils
import nltk
found = str(nltk.data.find("tokenizers/punkt_tab/english/"))
results = [utils.process_results(case["doc"], [case["response"]]) for case in json.load(sys.stdin)]
print(json.dumps({"found": found, "results": results}))
"""

NO_COMMA = {"key": 1001, "prompt": "I am planning a trip to Japan, and I would like thee to write an itinerary for my "
            "journey in a Shakespearean style. You are not allowed to use any commas in your response.",
            "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
FEW_SENTENCES = {"key": 1262, "prompt": "Can you elaborate on the following text: \"Increased axle weight increased "
                 "the damage to the road\"? Use less than 3 sentences.",
                 "instruction_id_list": ["length_constraints:number_sentences"],
                 "kwargs": [{"relation": "less than", "num_sentences": 3}]}
BULLETS = {"key": 102, "prompt": "Write a dialogue between two people going to a nightly event. Your answer must "
           "contain exactly 3 bullet points in the markdown format (use \"* \" to indicate each bullet).",
           "instruction_id_list": ["detectable_format:number_bullet_lists"], "kwargs": [{"num_bullets": 3}]}
LOWERCASE = {"key": 1019, "prompt": "Given the sentence \"Two young boys with toy guns and horns.\" can you ask a "
             "question? Please ensure that your response is in English, and in all lowercase letters. No capital "
             "letters are allowed.", "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]}
CAPITALS = {"key": 1314, "prompt": "Which of the following is not a fish: salmon or avocado? Use some words in all "
            "caps in your response, but those all-caps words should appear at most 10 times.",
            "instruction_id_list": ["change_case:capital_word_frequency", "change_case:capital_word_frequency"],
            "kwargs": [{"capital_relation": "less than", "capital_frequency": 11},
                       {"capital_relation": "at least", "capital_frequency": 1}]}
END_PHRASE = {"key": 1127, "prompt": "Write a poem about how I am missing my classes. Finish the poem with this exact "
              "phrase: \"Can I get my money back for the classes I missed?\"",
              "instruction_id_list": ["startend:end_checker"],
              "kwargs": [{"end_phrase": "Can I get my money back for the classes I missed?"}]}
GERMAN = {"key": 3494, "prompt": "Please write an email about our cheese products. Please make your response in only "
          "German, no other language is allowed.", "instruction_id_list": ["language:response_language"],
          "kwargs": [{"language": "de"}]}
TWO_RULES = {"key": 1000, "prompt": "Write a short summary of the history of Tripoli. Do not use any commas and use "
             "less than 3 sentences.", "instruction_id_list": ["punctuation:no_comma",
                                                                "length_constraints:number_sentences"],
             "kwargs": [{}, {"relation": "less than", "num_sentences": 3}]}

# (name, doc, response, strict per instruction, loose per instruction)
CASES = [
    ("no_comma obeyed", NO_COMMA, "Day one we land in Tokyo and wander the markets. Day two we ride to Kyoto.",
     [True], [True]),
    ("no_comma broken", NO_COMMA, "Day one, we land in Tokyo. Day two, we ride to Kyoto.", [False], [False]),
    # loose scoring also tries the response without its first line (a model's "Sure, ..." preamble)
    ("no_comma broken in a preamble only", NO_COMMA,
     "Sure, here is thy itinerary:\nDay one we land in Tokyo and wander the markets.", [False], [True]),
    # two sentences to Punkt ("Dr." is a known abbreviation); a split at every period would count three
    ("number_sentences obeyed, abbreviation kept", FEW_SENTENCES, "Dr. Smith went home. He was tired.",
     [True], [True]),
    ("number_sentences broken", FEW_SENTENCES, "Dr. Smith went home. He was tired. He slept until noon.",
     [False], [False]),
    ("number_bullet_lists obeyed", BULLETS, "* Anna: I wore my ball gown.\n* Ben: I wore sweats.\n* Anna: Let us go.",
     [True], [True]),
    ("number_bullet_lists broken", BULLETS, "* Anna: I wore my ball gown.\n* Ben: I wore sweats.", [False], [False]),
    ("english_lowercase obeyed", LOWERCASE,
     "what are the two young boys with toy guns and horns playing in the garden this afternoon?", [True], [True]),
    ("english_lowercase broken", LOWERCASE,
     "What are the two young boys with toy guns and horns playing in the garden this afternoon?", [False], [False]),
    ("capital_word_frequency obeyed (word_tokenize)", CAPITALS,
     "The AVOCADO is not a fish. The salmon is a FISH that swims upstream.", [True, True], [True, True]),
    ("capital_word_frequency broken: none in caps", CAPITALS,
     "The avocado is not a fish. The salmon is a fish that swims upstream.", [True, False], [True, False]),
    ("end_checker obeyed", END_PHRASE,
     "The bell rings and my seat is empty.\nCan I get my money back for the classes I missed?", [True], [True]),
    ("end_checker broken", END_PHRASE,
     "Can I get my money back for the classes I missed? The bell rings and my seat is empty.", [False], [False]),
    ("response_language obeyed", GERMAN,
     "Sehr geehrte Damen und Herren, unser Käse wird aus frischer Milch von Bauernhöfen aus der Region hergestellt "
     "und schmeckt wunderbar. Bestellen Sie noch heute und überzeugen Sie sich selbst.", [True], [True]),
    ("response_language broken", GERMAN,
     "Dear customers, our cheese is made from fresh milk from farms in the region and it tastes wonderful. "
     "Order today and see for yourself.", [False], [False]),
    ("two instructions, one broken", TWO_RULES,
     "Tripoli was founded by the Phoenicians. Later, the Romans and the Ottomans ruled it.", [False, True],
     [False, True]),
]


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    root = tmp_path_factory.mktemp("nltk_data")
    cases = [{"doc": doc, "response": response} for _, doc, response, _, _ in CASES]
    env = {k: v for k, v in os.environ.items() if k != "NLTK_DATA"}
    proc = subprocess.run([sys.executable, "-c", NO_NETWORK + _CHECKER, str(root)], input=json.dumps(cases),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Downloaded punkt_tab" not in proc.stdout  # lm-eval prints this after any download attempt
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return root, out


def test_checker_reads_punkt_tab_from_the_offline_root(checked):
    root, out = checked
    assert out["found"].startswith(str(root))


@pytest.mark.parametrize("index", range(len(CASES)), ids=[case[0] for case in CASES])
def test_checker_scores(checked, index):
    _, out = checked
    _, _, _, strict, loose = CASES[index]
    assert out["results"][index] == {"prompt_level_strict_acc": all(strict), "inst_level_strict_acc": strict,
                                      "prompt_level_loose_acc": all(loose), "inst_level_loose_acc": loose}
