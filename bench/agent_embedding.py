"""The offline default embedder (all-MiniLM-L6-v2 in numpy): cold start, speed, recall.

Prints figures; asserts nothing about speed (the machines are shared).

- cold start, in a fresh Python process: importing kelpie.agent._minilm,
  `MiniLMEmbedder.load()` (reading the 91 MB of weights and the tokenizer,
  checking their SHA-256, laying the weights out), the first embedding, and
  the process's peak resident memory (ru_maxrss) at the end;
- latency of one short text (15 to 25 tokens) at a time, `embed_query`,
  p50 and p99;
- throughput in texts per second through `embed_documents`, in batches of 32:
  short texts, and passages of about 120 tokens;
- recall on 40 questions that share no word with the passage they ask about
  (checked here), searched among the 40 passages: how many find their passage
  first (top-1) and among the first three (top-3), and the mean reciprocal
  rank. For the default embedder and for the hashing fake (the baseline: it
  only sees shared words, so it finds about what chance finds).

numpy's BLAS may use every core inside one matrix product; nothing else runs
in parallel.

Usage: python bench/agent_embedding.py [--texts N]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time

import numpy as np
import trio
from _report import Report, mib, ms, p50_p99, per_s

from kelpie.agent._embedding import Embedder, FakeEmbedder

#: (passage, a question about it that shares no word with it once lowercased)
PARAPHRASES = [
    (
        "The user's son starts kindergarten in September at the school near the park.",
        "When does her boy begin his first classes?",
    ),
    (
        "Our landlord raised the rent by two hundred dollars starting next month.",
        "How much more will housing cost us soon?",
    ),
    (
        "Priya is afraid of flying, so she takes trains whenever she can.",
        "Why does this traveller avoid airplanes?",
    ),
    (
        "The production database runs PostgreSQL 16 on a machine with 64 gigabytes of memory.",
        "Which SQL engine version powers our live system, and how much RAM?",
    ),
    (
        "He quit smoking three years ago after his doctor warned him about his lungs.",
        "When did that man give up cigarettes?",
    ),
    (
        "The wedding reception will be held in a vineyard outside Florence.",
        "Where are they celebrating their marriage?",
    ),
    ("Carlos is colorblind and cannot tell red from green.", "Which colours confuse this guy?"),
    (
        "The printer on the third floor keeps jamming when it prints double-sided pages.",
        "Which office device has paper problems?",
    ),
    (
        "My mother grows tomatoes, basil and peppers in her backyard garden.",
        "What vegetables plus herbs does mom cultivate at home?",
    ),
    (
        "The company switched its email provider to a new vendor to cut costs.",
        "Why did we change mail services?",
    ),
    (
        "Kenji plays the drums in a jazz band on weekends.",
        "Which musical hobby keeps him busy Saturdays?",
    ),
    (
        "The bridge downtown is closed for repairs until the end of summer.",
        "Why can't cars cross that river crossing right now?",
    ),
    (
        "The customer asked for a refund because the shoes arrived two sizes too small.",
        "Why does this buyer want money back?",
    ),
    (
        "Volcanoes form where molten rock rises through cracks in the crust.",
        "How do mountains that erupt come about?",
    ),
    (
        "Our sprint review is every other Friday at three in the afternoon.",
        "How often do we demo finished work to stakeholders?",
    ),
    ("Nora has two cats and a parrot that can whistle a tune.", "Which animals live with her?"),
    (
        "The invoice from the design agency is overdue by six weeks.",
        "Has that creative firm been paid yet?",
    ),
    (
        "He is lactose intolerant, so milk and cheese upset his stomach.",
        "What foods give that person digestive trouble?",
    ),
    (
        "The solar panels on the roof produce most of the house's electricity.",
        "Where does our home get its power?",
    ),
    (
        "The hiking trail to the waterfall takes about four hours round trip.",
        "How long does that walk towards those cascades last?",
    ),
    (
        "My laptop battery drains within an hour even when idle.",
        "Why won't this computer stay charged?",
    ),
    (
        "The museum is free on the first Sunday of every month.",
        "When can visitors enter that gallery without paying?",
    ),
    ("Ahmed is studying for his driving test next Wednesday.", "What exam will he sit soon?"),
    (
        "The team decided to rewrite the billing service in Go for better performance.",
        "Which language will payments code move into, plus why?",
    ),
    (
        "Rain is expected all weekend, so the picnic has been moved indoors.",
        "Why will our outdoor lunch happen inside?",
    ),
    (
        "She keeps her passport in the top drawer of the desk in the study.",
        "Where is that travel document stored?",
    ),
    (
        "The vaccine requires two doses given four weeks apart.",
        "How many shots are needed, and how far between them?",
    ),
    (
        "Our neighbour's dog barks loudly every morning at six.",
        "What wakes us early each day next door?",
    ),
    (
        "The quarterly board meeting was rescheduled because the chairman is ill.",
        "Why did directors postpone their gathering?",
    ),
    (
        "Emma wants to become a veterinarian when she grows up.",
        "What career does that girl dream about?",
    ),
    (
        "The refrigerator is making a buzzing noise and the freezer is not cold enough.",
        "Which kitchen appliance seems broken?",
    ),
    (
        "The library extended its opening hours until ten at night during exams.",
        "How late can students read there?",
    ),
    ("Leo ran his first half marathon in under two hours.", "How fast did he finish that race?"),
    (
        "The startup raised five million dollars from angel investors last month.",
        "How much funding did that young firm secure recently?",
    ),
    (
        "My grandfather fought in the navy and still tells stories about the sea.",
        "Which military branch did grandpa serve?",
    ),
    (
        "The air conditioner in the bedroom leaks water onto the carpet.",
        "Which cooling unit drips on our floor?",
    ),
    (
        "The software license expires on December thirty-first and must be renewed.",
        "When do we need to pay again for that program?",
    ),
    (
        "Olivia is allergic to cats, so she never visits homes with pets.",
        "Why does that woman avoid certain houses?",
    ),
    (
        "The train from Paris to London takes two and a quarter hours through the tunnel.",
        "How long is that Eurostar journey?",
    ),
    (
        "Bees pollinate flowers while collecting nectar to make honey.",
        "How do insects help plants reproduce?",
    ),
]

_WORD = re.compile(r"\w+")

RELATIVES = ["sister", "uncle", "neighbour", "colleague", "cousin", "friend", "dentist", "coach"]
CITIES = ["Lisbon", "Osaka", "Denver", "Nairobi", "Quebec", "Tallinn", "Perth", "Bogota"]
JOBS = ["nurse", "pilot", "baker", "teacher", "welder", "lawyer", "chemist", "florist"]


def short_texts(count: int) -> list[str]:
    """Notes of 15 to 25 tokens, all different."""
    return [
        f"Note {i}: the user's {RELATIVES[i % 8]} lives in {CITIES[i // 8 % 8]} "
        f"and works as a {JOBS[i // 64 % 8]}."
        for i in range(count)
    ]


def passages(count: int) -> list[str]:
    """Passages of about 120 tokens: six of the short notes, rotated."""
    notes = short_texts(count + 6)
    return [" ".join(notes[i : i + 6]) for i in range(count)]


#: Run by `python -c` in a fresh process: prints the cold-start timings as JSON.
COLD_CHILD = """
import json, resource, time
began = time.perf_counter()
import trio
from kelpie.agent._minilm import MiniLMEmbedder
imported = time.perf_counter()
embedder = MiniLMEmbedder.load()
loaded = time.perf_counter()
trio.run(embedder.embed_query, "The first text this process embeds.")
embedded = time.perf_counter()
print(json.dumps({
    "import_s": imported - began,
    "load_s": loaded - imported,
    "first_embed_s": embedded - loaded,
    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
}))
"""


def cold_start() -> Report:
    started = time.perf_counter()
    child = subprocess.run(
        [sys.executable, "-c", COLD_CHILD], capture_output=True, text=True, check=True
    )
    process_s = time.perf_counter() - started
    figures = json.loads(child.stdout.strip().splitlines()[-1])
    report = Report(
        "MiniLM cold start, in a fresh process (load: read + SHA-256 + lay out the weights)",
        ["what", "ms"],
    )
    rows = [
        ("import", "import trio and kelpie.agent._minilm (numpy, openai...)", figures["import_s"]),
        ("load", "MiniLMEmbedder.load()", figures["load_s"]),
        ("first_embed", "first embed_query", figures["first_embed_s"]),
        (
            "load_and_first_embed",
            "load + first embedding",
            figures["load_s"] + figures["first_embed_s"],
        ),
        ("process", "whole process, interpreter start to exit", process_s),
    ]
    for key, what, seconds in rows:
        report.add(f"embedding.minilm.cold.{key}", [what, ms(seconds)], ms=seconds * 1e3)
    peak = figures["peak_rss_bytes"]
    report.add(
        "embedding.minilm.cold.peak_rss",
        ["peak resident memory (MiB)", mib(peak)],
        mib=peak / 2**20,
    )
    return report


async def latencies(embedder: Embedder, texts: list[str]) -> list[float]:
    await embedder.embed_query("warm-up")
    out = []
    for text in texts:
        began = time.perf_counter()
        await embedder.embed_query(text)
        out.append(time.perf_counter() - began)
    return out


async def throughput(embedder: Embedder, texts: list[str], batch: int) -> float:
    await embedder.embed_documents(texts[:batch])  # warm-up
    began = time.perf_counter()
    for start in range(0, len(texts), batch):
        await embedder.embed_documents(texts[start : start + batch])
    return len(texts) / (time.perf_counter() - began)


async def ranks(embedder: Embedder) -> list[int]:
    """For each question, how many passages score above its own (0: found first)."""
    vectors = await embedder.embed_documents([p for p, _ in PARAPHRASES])
    out = []
    for target, (_, question) in enumerate(PARAPHRASES):
        scores = vectors @ await embedder.embed_query(question)
        out.append(int(np.sum(scores > scores[target])))
    return out


def check_no_shared_words() -> None:
    for passage, question in PARAPHRASES:
        shared = set(_WORD.findall(passage.lower())) & set(_WORD.findall(question.lower()))
        if shared:
            raise SystemExit(f"question {question!r} shares {sorted(shared)} with its passage")


async def main(count: int) -> None:
    from kelpie.agent._minilm import MiniLMEmbedder

    minilm = MiniLMEmbedder.load()
    short = short_texts(count)
    long = passages(count // 2)
    tokens = [len(minilm._tokenizer.encode(t).ids) for t in (short[0], long[0])]

    speed = Report(
        "MiniLM speed (numpy, this machine's cores for BLAS)",
        ["what", "p50 ms", "p99 ms", "texts/s"],
    )
    p50, p99 = p50_p99(await latencies(minilm, short[:200]))
    speed.add(
        "embedding.minilm.latency.short",
        [f"one short text ({tokens[0]} tokens) at a time", ms(p50), ms(p99), ""],
        p50_ms=p50 * 1e3,
        p99_ms=p99 * 1e3,
    )
    for key, texts, n_tokens in (("short", short, tokens[0]), ("passage", long, tokens[1])):
        rate = await throughput(minilm, texts, 32)
        speed.add(
            f"embedding.minilm.throughput.{key}.batch_32",
            [f"batches of 32 texts of {n_tokens} tokens", "", "", per_s(rate)],
            texts_per_s=rate,
        )
    speed.print()

    check_no_shared_words()
    recall = Report(
        f"recall: {len(PARAPHRASES)} questions sharing no word with their passage, "
        f"among {len(PARAPHRASES)} passages",
        ["embedder", "top-1", "top-3", "MRR"],
    )
    for key, embedder in (("minilm", minilm), ("fake_hash", FakeEmbedder())):
        found = await ranks(embedder)
        top1 = sum(r == 0 for r in found)
        top3 = sum(r < 3 for r in found)
        mrr = sum(1 / (r + 1) for r in found) / len(found)
        recall.add(
            f"embedding.recall.{key}",
            [embedder.model_id, f"{top1}/{len(found)}", f"{top3}/{len(found)}", f"{mrr:.3f}"],
            top1=top1,
            top3=top3,
            queries=len(found),
            mrr=mrr,
        )
    recall.print()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=int, default=640, help="short texts for throughput")
    arguments = parser.parse_args()
    cold_start().print()
    trio.run(main, arguments.texts)
