"""What the cost levers save on a support workload, priced from the ledger against the naive setup.

A support assistant's day (default 2,000 one-question conversations: 40% one of 20 FAQs in
several wordings, half the rest short simple questions, half long multi-part complex ones) and
an offline job of 1,000 ticket classifications, played twice in one run, each in a tenant of its
own, through the real engine (`conversations.engine.turn_submit`, routing, the response cache,
metering) and, for the classification job, the official SDK against Parley's own `/v1` served
in this process — with the simulator as the provider over real HTTP:

- **baseline** (naive): the assistant on the strong model, no response cache, no routes; the
  classification lines as ordinary `/v1/chat/completions` calls on the strong model.
- **levers** (what a support tenant would set): `response_cache` "semantic" on the assistant;
  routes `hard` (a question that says why / explain / compare / step by step → strong) then
  `short` (a prompt of at most `system prompt + 60` tokens → cheap), the strong model otherwise;
  the classification lines as one Batch (`files.create` + `batches.create`) on the cheap model,
  which the simulator runs with its own Batch API (50% off).

Every dollar comes from `UsageRecord` (cost and the `saved_*` columns, per kind); the share of
complex questions the strong model answered comes from `Message.model`.

    .venv/bin/python bench/cost_levers.py [--conversations 2000] [--batch-lines 1000] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
os.environ.setdefault("BATCH_POLL_SECONDS", "0")  # a retrieve polls the provider at once
os.environ.setdefault("LOG_LEVEL", "WARNING")
if not os.environ.get("DATABASE_URL"):
    os.environ.setdefault("SQLITE_PATH", os.path.join(tempfile.mkdtemp(), "bench.sqlite3"))

import django  # noqa: E402
from django.apps import apps  # noqa: E402

if not apps.ready:  # imported by a test, Django is already set up
    django.setup()

import openai  # noqa: E402
from django.conf import settings  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connections  # noqa: E402
from django.db.models import Count, Sum  # noqa: E402

from batches import tasks as batch_tasks  # noqa: E402
from billing.models import UsageRecord  # noqa: E402
from conversations import engine  # noqa: E402
from conversations.gatekeepers import Caller  # noqa: E402
from conversations.models import Message  # noqa: E402
from conversations.onboarding import tenant_onboard  # noqa: E402
from conversations.protocol import MessageCreate  # noqa: E402
from llm.tokens import count_text  # noqa: E402
from routing.rules import routes_validate  # noqa: E402
from tenants.services import end_user_get_or_create  # noqa: E402
from tests.simserver import SimulatorServer  # noqa: E402

STRONG, CHEAP = "gpt-4o", "gpt-4o-mini"
SYSTEM_PROMPT = (
    "You are the support assistant of Example Co., an online shop for home electronics. Answer "
    "precisely and politely, cite the order number when one is given, never invent policies, and "
    "keep answers short unless the customer asks several things. Policies: returns within 30 days "
    "in the original packaging; refunds to the original payment method within 5 business days of "
    "receiving the return; standard shipping 3-5 business days, express next day before 2 pm; "
    "warranty 2 years on all devices, 3 years on Example-brand devices; invoices are in the account "
    "under Orders; price match within 14 days of purchase against listed competitors only. "
) * 2
CLASSIFY = ("Classify this support ticket into exactly one of: billing, shipping, account, product, "
            "other. Answer with the label only.\n\nTicket: ")

# 20 FAQs; each is asked in the wordings below (one exact duplicate up to case, two paraphrases
# with the same content words, one with an extra word).
FAQS = [
    "reset my password", "track my order", "return an item", "change my delivery address",
    "cancel my order", "get an invoice", "update my payment method", "apply a discount code",
    "contact a human agent", "delete my account", "change my email address",
    "check my warranty", "exchange a product for another size", "find my order number",
    "pay in installments", "ship to another country", "get express shipping",
    "unsubscribe from the newsletter", "report a damaged delivery", "claim a price match",
]
FAQ_WORDINGS = ["How do I {q}?", "how can i {q} please", "HOW DO I {Q}", "{Q}: how do I do that?",
                "Can you tell me how I {q}?"]
PRODUCTS = "headphones laptop kettle monitor speaker keyboard camera router tablet charger".split()
CITIES = "Lyon Leeds Porto Graz Ghent Turin Malmo Bergen Cork Brno".split()
SIMPLE = [
    "Where is order #{n}?", "Is the {p} in stock?", "Do you deliver to {c}?",
    "Can I still change the address on order #{n} to {c}?", "Is the {p} compatible with a Mac?",
    "Has my refund for order #{n} gone through?", "What colour options does the {p} come in?",
    "Is order #{n} going out today?",
]
# A complex question: two or three of these problems, then two of the asks (50-100 words).
PROBLEMS = [
    "The {p} from order #{n} arrived with a cracked casing.", "The replacement {p} you sent was the wrong model.",
    "My invoice for order #{n} charges me twice.", "The discount code I entered at checkout was not applied.",
    "I paid for express shipping to {c} and waited a week.",
    "The courier marked order #{n} delivered but nothing came.",
    "My {p} stopped charging after the latest firmware update.",
    "I moved to {c} last month and my saved address is still the old one.",
    "My bank shows a pending charge from you that I do not recognise.",
    "Half of the accessories were missing from the {p} box.",
    "My loyalty points disappeared after I returned order #{n}.",
    "An agent promised me a callback twice and nobody called.",
    "The price of the {p} dropped two days after I bought it.",
    "I want to upgrade to the newer {p} and trade in the old one.",
]
ASKS = [
    "Can I return everything together, and who pays the return shipping?",
    "When will the refund reach my card, and will the price match still apply?",
    "Please tell me what you will refund and what I have to send back.",
    "Does the warranty cover this, and how long does a repair take?",
    "What happens to my account credit and my loyalty points?",
    "What are the deadlines for each part, given that I already opened a claim with my bank?",
    "Could you list the steps in order, because I travel next week?",
    "Can you send a replacement before I send the faulty one back?",
    "Is there any compensation for the delay and the extra calls?",
    "Which of these can you fix today and which need a specialist?",
]
# A tenth of the complex questions are short but say what makes them hard.
SHORT_HARD = [
    "Why was I charged twice for order #{n}? Explain.", "Compare the {p} with the older model for me.",
    "Explain why my parcel to {c} went back to the depot.", "Why did my {p} warranty claim get refused?",
    "Explain the difference between your two {p} plans step by step.",
    "Why is the {p} cheaper on your site in {c} than here?",
]
TICKETS = [
    "My card was charged twice for order #{n}.", "The {p} I received does not turn on.",
    "I cannot log in since I changed my email.", "Parcel for order #{n} is stuck in {c}.",
    "Please send me a VAT invoice for order #{n}.", "Do you have the {p} in white?",
    "The courier left order #{n} at the wrong door in {c}.", "How do I close my account?",
]


@dataclass(frozen=True)
class Question:
    kind: str  # "faq" | "simple" | "complex"
    text: str
    topic: str  # what a right answer answers: the FAQ, else the question itself


def _fill(template: str, rng: random.Random) -> str:
    return template.format(n=rng.randint(100_000, 999_999), p=rng.choice(PRODUCTS), c=rng.choice(CITIES))


ANSWER_WORDS = (70, 50, 250)  # FAQ, simple, complex: what a support assistant writes for each


def workload(conversations: int, seed: int = 14, words: tuple[int, int, int] = ANSWER_WORDS) -> list[Question]:
    """First questions: 40% FAQs, 30% simple, 30% complex (a tenth of these short but hard),
    shuffled. Answer lengths (`words`, FAQ, simple, complex) are asked of the simulator."""
    faq_words, simple_words, complex_words = words
    rng = random.Random(seed)
    faqs = round(conversations * 0.4)
    simple = (conversations - faqs) // 2
    questions = []
    for _ in range(faqs):
        topic = rng.choice(FAQS)
        wording = rng.choice(FAQ_WORDINGS).format(q=topic, Q=topic.upper() if rng.random() < 0.5 else topic.capitalize())
        questions.append(Question("faq", f"{wording} [[sim:words={faq_words}]]", topic))
    for _ in range(simple):
        text = _fill(rng.choice(SIMPLE), rng)
        questions.append(Question("simple", f"{text} [[sim:words={simple_words}]]", text))
    for index in range(conversations - faqs - simple):
        if index % 10 == 9:
            text = _fill(rng.choice(SHORT_HARD), rng)
        else:
            parts = rng.sample(PROBLEMS, rng.choice((2, 3))) + rng.sample(ASKS, 2)
            text = " ".join(_fill(part, rng) for part in parts)
        questions.append(Question("complex", f"{text} [[sim:words={complex_words}]]", text))
    rng.shuffle(questions)
    return questions


def classification_lines(count: int, model: str, seed: int = 15) -> list[dict]:
    rng = random.Random(seed)
    return [{"custom_id": f"ticket-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": model, "max_tokens": 3, "temperature": 0,
                      "messages": [{"role": "user", "content": CLASSIFY + _fill(rng.choice(TICKETS), rng)}]}}
            for i in range(count)]


@dataclass(frozen=True)
class Run:
    name: str
    tenant_id: int
    api_key: str
    callers: list[Caller]


def run_create(name: str, base_url: str, *, cache: str | None, end_users: int = 50) -> Run:
    onboarded = tenant_onboard(
        slug=f"levers-{name}-{uuid.uuid4().hex[:6]}", model=STRONG, provider_base_url=base_url,
        provider_key=f"sk-bench-{uuid.uuid4().hex}", system_prompt=SYSTEM_PROMPT,
    )
    tenant, assistant = onboarded.tenant, onboarded.assistant
    tenant.end_user_rpm = tenant.tenant_rpm = 1_000_000
    tenant.tenant_tpm = 1_000_000_000
    tenant.save()
    assistant.max_tokens = 600
    if cache is not None:  # the levers run
        assistant.response_cache = cache
        short = count_text(SYSTEM_PROMPT, STRONG) + 60  # the whole prompt: system prompt + question
        assistant.routes = routes_validate([  # as the admin and REST check them
            {"name": "hard", "model": STRONG, "when": {"pattern": r"(?i)\b(why|explain|compare|step by step)\b"}},
            {"name": "short", "model": CHEAP, "when": {"max_input_tokens": short, "tools": False}},
        ])
    assistant.save()
    callers = [Caller(tenant_id=tenant.pk, end_user_id=end_user_get_or_create(
        tenant_id=tenant.pk, external_id=f"customer-{i}").pk) for i in range(end_users)]
    return Run(name=name, tenant_id=tenant.pk, api_key=onboarded.api_key, callers=callers)


async def conversations_play(run: Run, questions: list[Question], concurrency: int) -> dict[uuid.UUID, Question]:
    """Each question opens a conversation through the engine; returns conversation → question."""
    asked: dict[uuid.UUID, Question] = {}
    queue = list(enumerate(questions))

    async def agent() -> None:
        while queue:
            index, question = queue.pop()
            caller = run.callers[index % len(run.callers)]
            submitted = await engine.turn_submit(caller=caller, command=MessageCreate(content=question.text))
            asked[submitted.plan.conversation_id] = question
            name = f"generation {submitted.plan.assistant_message_id}"
            await asyncio.gather(*(task for task in engine.generations_running() if task.get_name() == name))

    await asyncio.gather(*(agent() for _ in range(concurrency)))
    return asked


def classify_baseline(run: Run, base_url: str, lines: list[dict], concurrency: int) -> None:
    """The naive job: one ordinary chat call per line, on the strong model."""
    client = openai.OpenAI(base_url=base_url, api_key=run.api_key, max_retries=2)
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda line: client.chat.completions.create(**line["body"]), lines))


def classify_batch(run: Run, base_url: str, lines: list[dict]) -> str:
    """The same job as one Batch through the official SDK; returns its final status."""
    try:
        return _batch_run(run, base_url, lines)
    finally:
        connections.close_all()  # this thread's, opened by the batch tasks


def _batch_run(run: Run, base_url: str, lines: list[dict]) -> str:
    client = openai.OpenAI(base_url=base_url, api_key=run.api_key, max_retries=2)
    content = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    upload = client.files.create(file=("tickets.jsonl", content), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    pk = str(uuid.UUID(batch.id.removeprefix("batch_")))
    for _ in range(60):
        # What a worker and beat do (in embedded mode Celery is eager and the start already ran).
        batch_tasks.batch_start(pk)
        batch_tasks.batch_poll(pk)
        batch = client.batches.retrieve(batch.id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            break
        time.sleep(0.2)
    answered = client.files.content(batch.output_file_id).text.splitlines() if batch.output_file_id else []
    if len(answered) != len(lines):
        raise SystemExit(f"batch {batch.id} ended {batch.status} with {len(answered)}/{len(lines)} lines answered")
    return batch.status


@dataclass(frozen=True)
class Answers:
    """Who answered what, from the assistant messages: per class, the questions, the cache hits,
    the hits that served another question's answer, and the answers of the strong model."""

    asked: Counter
    hits: Counter
    wrong_hits: Counter
    by_strong: Counter


def answers_check(run: Run, asked: dict[uuid.UUID, Question]) -> Answers:
    """A hit is right when the stored answer it served was generated for the same FAQ (or the
    same question); it counts as the strong model's when that answer was the strong model's."""
    rows = list(Message.objects.filter(tenant_id=run.tenant_id, role=Message.Role.ASSISTANT)
                .values_list("conversation_id", "content", "model", "cached"))
    origin = {content: (asked[conversation].topic, model) for conversation, content, model, cached in rows
              if not cached}
    counts: dict[str, Counter] = {name: Counter() for name in ("asked", "hits", "wrong_hits", "by_strong")}
    for conversation, content, model, cached in rows:
        question = asked[conversation]
        counts["asked"][question.kind] += 1
        if cached:
            counts["hits"][question.kind] += 1
            source_topic, model = origin.get(content, (None, ""))
            if source_topic != question.topic:
                counts["wrong_hits"][question.kind] += 1
                continue
        counts["by_strong"][question.kind] += model == STRONG
    return Answers(**counts)


@dataclass
class Priced:
    """One run's ledger: dollars and counts by kind and by question class, the savings."""

    tenant_id: int
    by_kind: dict[str, tuple[int, Decimal]]
    by_class: dict[str, Decimal]
    saved: dict[str, Decimal]
    routed_cheap: int
    answers: Answers

    @property
    def total(self) -> Decimal:
        return sum((cost for _, cost in self.by_kind.values()), Decimal(0))


SAVED = {"response cache": "saved_response_cache_usd", "routing": "saved_routing_usd",
         "batch": "saved_batch_usd", "cached input": "saved_cached_input_usd"}


def ledger_price(run: Run, asked: dict[uuid.UUID, Question]) -> Priced:
    rows = UsageRecord.objects.filter(tenant_id=run.tenant_id)
    by_kind = {row["kind"]: (row["n"], row["cost"]) for row in
               rows.values("kind").annotate(n=Count("id"), cost=Sum("cost_usd"))}
    by_class: dict[str, Decimal] = defaultdict(Decimal)
    for row in rows.values("conversation_id", "kind").annotate(cost=Sum("cost_usd")):
        if row["conversation_id"] is not None:
            by_class[asked[row["conversation_id"]].kind] += row["cost"]
        else:
            by_class["classification" if row["kind"] in ("completion", "batch") else "other"] += row["cost"]
    saved = {name: rows.aggregate(total=Sum(column))["total"] or Decimal(0) for name, column in SAVED.items()}
    return Priced(tenant_id=run.tenant_id, by_kind=by_kind, by_class=dict(by_class), saved=saved,
                  routed_cheap=rows.filter(kind="chat", model=CHEAP).exclude(call_id__startswith="grade-").count(),
                  answers=answers_check(run, asked))


def report(comparison: Comparison) -> float:
    questions, lines, base, levers = (comparison.questions, comparison.batch_lines, comparison.baseline,
                                      comparison.levers)
    mix = Counter(question.kind for question in questions)
    print(f"\nSupport workload: {len(questions):,} conversations ({mix['faq']:,} FAQ, {mix['simple']:,} simple, "
          f"{mix['complex']:,} complex) + {lines:,} classification lines; strong {STRONG}, cheap {CHEAP}")
    print(f"USD from the ledger (UsageRecord.cost_usd)\n{'':34}{'baseline':>12}{'levers':>12}{'levers/base':>13}")
    for name in ("faq", "simple", "complex", "classification", "other"):
        b, lv = base.by_class.get(name, Decimal(0)), levers.by_class.get(name, Decimal(0))
        if b or lv:
            print(f"  {name:<32}{b:>12.4f}{lv:>12.4f}{(lv / b if b else 0):>12.2f}x")
    print("  by ledger kind (rows, USD):")
    for kind in sorted(set(base.by_kind) | set(levers.by_kind)):
        (bn, bc), (ln, lc) = base.by_kind.get(kind, (0, Decimal(0))), levers.by_kind.get(kind, (0, Decimal(0)))
        print(f"    {kind:<14}{bn:>7,} / {ln:<7,}     {bc:>12.4f}{lc:>12.4f}")
    ratio = float(levers.total / base.total)
    print(f"  {'TOTAL':<32}{base.total:>12.4f}{levers.total:>12.4f}{ratio:>12.2f}x   (goal <= 0.35x)")
    print("\nWhat each lever saved on the levers run (the ledger's saved_* columns, against list price):")
    for name, value in levers.saved.items():
        print(f"  {name:<16}{value:>12.4f}   ({float(value / base.total):.1%} of the baseline)")
    listed = levers.total + sum(levers.saved.values(), Decimal(0))
    print(f"  levers at list price (cost + savings) {listed:.4f}; the baseline's own cached-input saving "
          f"{base.saved['cached input']:.4f}")
    print(f"  response-cache hits {levers.by_kind.get('cached', (0, 0))[0]:,}; support answers routed to {CHEAP} "
          f"{levers.routed_cheap:,}")
    answers = levers.answers
    print("\nAnswers on the levers run (Message.model, .cached; a wrong hit served another question's answer):")
    for kind in ("faq", "simple", "complex"):
        print(f"  {kind:<8} {answers.asked[kind]:>6,} asked, {answers.hits[kind]:>6,} from the cache "
              f"({answers.wrong_hits[kind]:,} wrong), {answers.by_strong[kind]:>6,} by {STRONG}")
    strong, asked = answers.by_strong["complex"], answers.asked["complex"]
    print(f"Complex questions answered by {STRONG} (generated, or a right hit on its answer): {strong:,}/{asked:,} = "
          f"{strong / max(asked, 1):.1%}   (goal >= 95%)")
    floor = float(base.by_class.get("complex", Decimal(0)) / base.total)
    print(f"Complex questions are {floor:.1%} of the baseline's cost: with them on {STRONG}, no lever takes "
          f"the total below about {floor:.2f}x.")
    return ratio


@dataclass(frozen=True)
class Comparison:
    questions: list[Question]
    batch_lines: int
    baseline: Priced
    levers: Priced


def levers_compare(*, provider_url: str, v1_url: str, conversations: int, batch_lines: int, cache: str = "semantic",
                   concurrency: int = 4, words: tuple[int, int, int] = ANSWER_WORDS) -> Comparison:
    """Both runs, each in a new tenant on the provider at `provider_url`, with Parley's `/v1`
    at `v1_url`; priced from the ledger."""
    questions = workload(conversations, words=words)
    base = run_create("baseline", provider_url, cache=None)
    levers = run_create("levers", provider_url, cache=cache)
    asked = asyncio.run(runs_play(base, levers, questions, v1_url, batch_lines, concurrency))
    return Comparison(questions, batch_lines, ledger_price(base, asked[0]), ledger_price(levers, asked[1]))


async def runs_play(base: Run, levers: Run, questions: list[Question], v1: str, lines: int,
                    concurrency: int) -> tuple[dict[uuid.UUID, Question], dict[uuid.UUID, Question]]:
    """Both runs in one event loop (the engine's in-process channel layer and event log live
    on it); the SDK's blocking calls on threads."""
    clock = time.monotonic()

    def lap(what: str) -> None:
        nonlocal clock
        print(f"  {what}: {time.monotonic() - clock:.1f} s", file=sys.stderr)
        clock = time.monotonic()

    base_asked = await conversations_play(base, questions, concurrency)
    lap("baseline conversations")
    await asyncio.to_thread(classify_baseline, base, v1, classification_lines(lines, STRONG), concurrency)
    lap("baseline classification (/v1 calls)")
    levers_asked = await conversations_play(levers, questions, concurrency)
    lap("levers conversations")
    await asyncio.to_thread(classify_batch, levers, v1, classification_lines(lines, CHEAP))
    lap("levers classification (a Batch)")
    return base_asked, levers_asked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conversations", type=int, default=2000)
    parser.add_argument("--batch-lines", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--cache", choices=("exact", "semantic"), default="semantic",
                        help="the levers run's response cache")
    parser.add_argument("--quick", action="store_true", help="200 conversations and 100 lines")
    parser.add_argument("--answer-words", default=",".join(map(str, ANSWER_WORDS)),
                        help="answer lengths in words asked of the simulator: FAQ,simple,complex")
    args = parser.parse_args()
    if args.quick:
        args.conversations, args.batch_lines = min(args.conversations, 200), min(args.batch_lines, 100)
    from tests.liveserver import ThreadServer

    words = tuple(int(value) for value in args.answer_words.split(","))
    if len(words) != 3 or min(words) < 1:
        parser.error("--answer-words takes three positive numbers: FAQ,simple,complex")
    call_command("migrate", verbosity=0)
    started = time.monotonic()
    with SimulatorServer() as simulator:
        parley = ThreadServer()
        parley.start()
        try:
            comparison = levers_compare(
                provider_url=simulator.base_url, v1_url=f"http://127.0.0.1:{parley.port}/v1",
                conversations=args.conversations, batch_lines=args.batch_lines, cache=args.cache,
                concurrency=args.concurrency, words=words,
            )
        finally:
            parley.stop()
    report(comparison)
    print(f"Answers asked of the simulator: FAQ {words[0]} words, simple {words[1]}, complex {words[2]}")
    print(f"\n({time.monotonic() - started:.0f} s, {'services' if settings.SERVICES_MODE else 'embedded'} mode)")


if __name__ == "__main__":
    main()
