"""The playground page in a real browser: Debian's Chromium driven by Playwright, against the embedded default
on the toy world (and a gateway with API keys on). Each view is checked against what the API itself returns
for the same request; the screenshots go to ``docs/playground/``."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from evaluation.gateway import LocalGateway
from server.auth import key_hash

playwright_api = pytest.importorskip("playwright.sync_api")

SCREENSHOTS = Path(__file__).parents[2] / "docs" / "playground"
# Chromium as root on a closed network: no sandbox, and none of its background connections.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]  # fmt: skip
QUESTION = "What is the capital of Laren?"
KEY = "sk-alignd-playground-test-0123456789abcdef"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = shutil.which("chromium")
    if executable is None:
        reason = "Debian's chromium is not installed (`make test` installs it with apt where it runs as root)"
        if os.environ.get("ALIGND_REQUIRE_BROWSER"):
            pytest.fail(reason)
        pytest.skip(reason)
    with playwright_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


class Playground:
    """The page in a fresh browser context, with every console error and uncaught exception it had."""

    def __init__(self, browser: Any, url: str) -> None:
        self.context = browser.new_context(viewport={"width": 1400, "height": 1000})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda message: self._console(message))
        self.page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))
        self.page.goto(f"{url}/playground")
        self.sent = 0

    def _console(self, message: Any) -> None:
        # Chromium logs each refused request (a 400, a 401) as an error; those are what some tests send.
        if message.type == "error" and not any(f"status of {code}" in message.text for code in (400, 401)):
            self.errors.append(message.text)

    def wait_ready(self) -> None:
        self.page.wait_for_selector("body[data-ready=true]", timeout=60_000)

    def ask(self, model: str, *, endpoint: str = "chat", prompt: str = QUESTION, **fields: str) -> None:
        page = self.page
        page.select_option("#f-model", model)
        page.select_option("#f-endpoint", endpoint)
        page.fill("#f-prompt", prompt)
        for name, value in fields.items():
            page.fill(f"#f-{name}", value)
        page.click("#send")
        self.sent += 1
        page.wait_for_selector(f"#results[data-done='{self.sent}']", timeout=120_000)

    def enable(self, method: str, **params: str) -> None:
        self.page.check(f"#f-{method}-on")
        for name, value in params.items():
            self.page.fill(f"#f-{method}-{name}", value)

    def screenshot(self, name: str) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SCREENSHOTS / name), full_page=True)

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def playground(browser: Any, toy_gateway: LocalGateway) -> Iterator[Playground]:
    page = Playground(browser, toy_gateway.url)
    page.wait_ready()
    yield page
    page.close()


def details_of(gateway: LocalGateway, route: str, body: dict[str, Any]) -> dict[str, Any]:
    """The first choice of the same request through the API, unstreamed, with its details."""
    body = {**body, "alignment": {**body.get("alignment", {}), "return_details": True}}
    response = httpx.post(f"{gateway.url}/v1/{route}", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return dict(response.json()["choices"][0])


def test_the_page_loads_without_console_errors_and_offers_every_method_of_the_schema(
    playground: Playground, toy_gateway: LocalGateway
):
    spec = httpx.get(f"{toy_gateway.url}/openapi.json", timeout=30).json()
    methods = [name for name in spec["components"]["schemas"]["Alignment"]["properties"] if name != "return_details"]
    page = playground.page
    assert (
        page.eval_on_selector_all("#methods > details.method", "panels => panels.map(p => p.dataset.path)") == methods
    )
    served = [card["id"] for card in httpx.get(f"{toy_gateway.url}/v1/models", timeout=30).json()["data"]]
    assert page.eval_on_selector_all("#f-model option", "options => options.map(o => o.value)") == served
    page.click("#f-nudging summary")
    gamma = page.locator("#f-nudging-gamma")  # the schema's default and bounds
    assert (gamma.input_value(), gamma.get_attribute("min"), gamma.get_attribute("max")) == ("0.4", "0", "1")
    assert playground.errors == []


def test_nudging_colours_each_span_by_the_model_that_wrote_it(playground: Playground, toy_gateway: LocalGateway):
    playground.ask("toy-nudged", max_tokens="48", seed="0", temperature="0")
    spans = playground.page.eval_on_selector_all(
        ".result .answer .span",
        "spans => spans.map(s => [s.dataset.source, s.textContent, getComputedStyle(s).backgroundColor, s.title])",
    )
    expected = details_of(toy_gateway, "chat/completions", {
        "model": "toy-nudged", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 48, "seed": 0,
        "temperature": 0,
    })["alignment"]["nudging"]  # fmt: skip
    assert [(source, text) for source, text, _, _ in spans] == [(s["source"], s["text"]) for s in expected["spans"]]
    colours = {source: colour for source, _, colour, _ in spans}
    assert set(colours) == {"toy-nudger", "toy-base"} and len(set(colours.values())) == 2, colours
    assert all(colours[source] == colour for source, _, colour, _ in spans), "one colour per model"
    for (source, _, _, title), span in zip(spans, expected["spans"], strict=True):
        assert title.startswith(f"written by {source}")
        if span["base_p1"] is not None:
            assert f"{span['base_p1']:.3f}" in title  # where the base handed over, on hover
    fraction = playground.page.text_content(".nudged-fraction")
    assert fraction == f"{100 * expected['nudged_token_fraction']:.1f}%"
    assert playground.errors == []
    playground.screenshot("nudging.png")


def test_best_of_n_lists_every_candidate_with_its_rewards(playground: Playground, toy_gateway: LocalGateway):
    playground.ask("toy-chat-best-of-8", max_tokens="32", seed="3", temperature="1")
    rows = playground.page.eval_on_selector_all(
        ".best-of-n tbody tr", "rows => rows.map(r => [r.className, ...[...r.cells].map(c => c.textContent)])"
    )
    assert len(rows) == 8
    expected = details_of(toy_gateway, "chat/completions", {
        "model": "toy-chat-best-of-8", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 32,
        "seed": 3, "temperature": 1,
    })["alignment"]["best_of_n"]  # fmt: skip
    shown = [(int(index), float(reward), float(rm)) for _, index, reward, rm, _ in rows]
    assert shown == [
        (c["index"], round(c["reward"], 3), round(c["rewards"]["toy-rm"], 3)) for c in expected["candidates"]
    ]
    chosen = [int(index) for kind, index, *_ in rows if kind == "chosen"]
    assert chosen == [expected["chosen"]] and shown[expected["chosen"]][1] == max(reward for _, reward, _ in shown)
    assert "select max" in playground.page.text_content(".best-of-n h4")
    assert playground.errors == []
    playground.screenshot("best-of-n.png")


def test_transfer_q_shows_each_steps_candidates_with_bars(playground: Playground, toy_gateway: LocalGateway):
    prompt = f"User: {QUESTION}\nAssistant:"
    playground.ask("toy-transfer-q", endpoint="completions", prompt=prompt, max_tokens="6", seed="0")
    steps = playground.page.eval_on_selector_all(
        ".guided.transfer_q table.step",
        "tables => tables.map(t => [...t.rows].map(r => [r.className, r.cells[1].textContent, "
        "r.querySelectorAll('.bar').length]))",
    )
    expected = details_of(toy_gateway, "completions", {"model": "toy-transfer-q", "prompt": prompt, "max_tokens": 6,
                                                       "seed": 0})["alignment"]["transfer_q"]  # fmt: skip
    assert len(steps) == len(expected["steps"]) == expected["decision_steps"]
    for rows, step in zip(steps, expected["steps"], strict=True):
        assert [text for _, text, _ in rows] == [json.dumps(c["text"], ensure_ascii=False) for c in step["candidates"]]
        assert [index for index, (kind, _, _) in enumerate(rows) if kind == "chosen"] == [step["chosen"]]
        assert all(bars == 2 for _, _, bars in rows)  # the base's probability and the method's value
    assert playground.errors == []
    playground.screenshot("transfer-q.png")


def test_compare_shows_the_plain_and_the_aligned_answer_and_the_heat_map(playground: Playground):
    playground.page.check("#f-compare")
    playground.ask("toy-chat-best-of-8", max_tokens="32", seed="3", temperature="1")
    page = playground.page
    titles = page.eval_on_selector_all(".result h3", "titles => titles.map(t => t.textContent)")
    assert titles == ["plain: toy-baseline", "aligned: toy-chat-best-of-8"]
    answers = page.eval_on_selector_all(".result .answer", "answers => answers.map(a => a.textContent)")
    assert len(answers) == 2 and all(answer.strip() for answer in answers)
    plain = page.locator(".result").first
    plain.locator(".heat-toggle").check()
    tokens = plain.locator(".answer .token")
    # Every token of the answer, and the end-of-turn token where it stopped (vLLM reports its logprob too).
    assert tokens.count() > 0 and "".join(tokens.all_text_contents()).startswith(answers[0])
    assert tokens.first.get_attribute("title").startswith("top-1 p = ")
    assert playground.errors == []
    playground.screenshot("compare.png")


def test_guidelines_and_grammar_say_what_was_injected_and_whether_the_output_is_complete(
    playground: Playground, toy_gateway: LocalGateway
):
    question = "Should I invest in wine?"
    playground.ask("toy-guided", prompt=question, max_tokens="32")
    shown = playground.page.eval_on_selector_all(".guidelines li", "items => items.map(i => i.textContent)")
    expected = details_of(toy_gateway, "chat/completions", {
        "model": "toy-guided", "messages": [{"role": "user", "content": question}], "max_tokens": 32,
    })["alignment"]["guidelines"]  # fmt: skip
    assert len(shown) == len(expected["guidelines"]) > 0
    for text, guideline in zip(shown, expected["guidelines"], strict=True):
        assert text.startswith(guideline["title"]) and f"similarity {guideline['score']:.3f}" in text

    playground.page.select_option("#f-model", "toy-base")  # its panels show once a model is picked
    playground.enable("grammar", grammar="(Yes|No)\\.")
    playground.page.select_option("#f-grammar-syntax", "regex")
    playground.ask("toy-base", endpoint="completions", prompt="User: Is Sisam the capital of Laren?\nAssistant:",
                   max_tokens="8")  # fmt: skip
    facts = playground.page.text_content(".details.grammar p")
    assert facts.startswith("asap (regex); complete; trie: ") and "learned P(L)" in facts
    assert playground.errors == []


@pytest.mark.parametrize(
    ("params", "field"),
    [({"nudger": "no-such-model"}, "nudger"), ({"nudger": "toy-nudger", "gamma": "5"}, "gamma")],
)
def test_a_bad_parameter_shows_the_servers_message_next_to_its_field(
    playground: Playground, toy_gateway: LocalGateway, params: dict[str, str], field: str
):
    playground.enable("nudging", **params)
    playground.ask("toy-base", endpoint="completions", prompt="User: Hi\nAssistant:", max_tokens="8")
    nudging = {name: float(value) if name == "gamma" else value for name, value in params.items()}
    response = httpx.post(f"{toy_gateway.url}/v1/completions", timeout=60, json={
        "model": "toy-base", "prompt": "User: Hi\nAssistant:", "max_tokens": 8, "alignment": {"nudging": nudging},
    })  # fmt: skip
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == f"alignment.nudging.{field}"
    assert playground.page.text_content(f"#f-nudging-{field}-error") == error["message"]
    assert playground.errors == []


@pytest.fixture(scope="module")
def keyed_gateway(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGateway]:
    directory = tmp_path_factory.mktemp("keyed-playground")
    config = yaml.safe_load((Path(__file__).parents[2] / "deploy" / "tiny-models.yaml").read_text())
    config |= {"model_root": str(tiny_models), "tiny_models": False,
               "auth": {"enabled": True, "keys": [{"name": "web", "hash": key_hash(KEY)}]}}  # fmt: skip
    (directory / "alignd.yaml").write_text(yaml.safe_dump(config))
    with LocalGateway(directory / "alignd.yaml", directory / "alignd.log") as live:
        yield live


def test_with_api_keys_on_the_page_asks_for_a_key_and_keeps_it_for_the_session_only(
    browser: Any, keyed_gateway: LocalGateway
):
    first = Playground(browser, keyed_gateway.url)
    page = first.page
    page.wait_for_selector("#key-form:not([hidden])")
    page.fill("#api-key", "sk-alignd-wrong")
    page.click("#key-form button")
    page.wait_for_function("document.querySelector('#key-message').textContent.includes('Invalid API key')")
    page.fill("#api-key", KEY)
    page.click("#key-form button")
    first.wait_ready()
    assert page.eval_on_selector_all("#f-model option", "options => options.length") > 0
    assert page.evaluate("[sessionStorage.getItem('alignd-api-key'), localStorage.length]") == [KEY, 0]
    first.ask("tiny-base", endpoint="completions", prompt="hello", max_tokens="4")
    assert page.locator(".result .answer").count() == 1
    first.close()
    second = Playground(browser, keyed_gateway.url)  # a new session: the key is not kept
    second.page.wait_for_selector("#key-form:not([hidden])")
    assert second.page.evaluate("sessionStorage.length") == 0
    second.close()
