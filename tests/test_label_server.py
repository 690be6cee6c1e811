"""The labelling page (launch/label_server.py) on a real server (uvicorn on 127.0.0.1), driven by a real client:
httpx for the HTTP API, and headless Chromium (the OS package, through Selenium and chromium-driver) for the page,
as a labeler uses it: ranks three prompts (keys, clicks, a tie), thumbs two answers; the export equals what was
clicked; a wrong token is refused; an answer holding <script> shows as text. Screenshots go to tmp_path, and to
$LABEL_SCREENSHOTS when set (the README's picture is made so)."""
import os
import shutil
from pathlib import Path

import httpx
import pytest

from rlhf_ray.label_store import LabelStore

EVIL = "<script>window.pwned = 1</script><b>bold?</b> & <img src=x onerror=\"window.pwned = 2\">"


@pytest.fixture
def server(tmp_path):
    from launch.label_server import Page
    store = LabelStore(tmp_path / "labels.sqlite")
    page = Page(store, "127.0.0.1", 0)
    assert page.url.startswith("http://127.0.0.1:")
    yield page.url.rstrip("/"), store
    page.stop()


def test_the_api_wants_a_token_and_a_lead_for_the_lead_s_calls(server):
    url, store = server
    ann, lee = store.add_labeler("ann"), store.add_labeler("lee", lead=True)
    [t] = store.add_tasks("b", [{"prompt": "p", "responses": ["x", "y"]}])
    h = lambda tok: {"Authorization": f"Bearer {tok}"}          # noqa: E731
    with httpx.Client(base_url=url) as c:
        assert c.get("/api/next").status_code == 401
        r = c.get("/api/next", headers=h("wrong"))
        assert r.status_code == 401 and "no valid token" in r.json()["detail"]
        assert c.get("/api/export/rankings", headers=h(ann)).status_code == 403
        assert c.post("/api/tasks", headers=h(ann), json={"batch": "b", "rows": []}).status_code == 403
        r = c.get("/api/next", headers=h(ann))
        assert r.json()["task"]["task"] == t and "default-src 'none'" in r.headers["content-security-policy"]
        r = c.post("/api/label", headers=h(ann), json={"task": t, "tiers": [[0]]})
        assert r.status_code == 400 and r.json()["error"] == "tiers: every answer position 0..1 exactly once, got [0]"
        assert c.post("/api/label", headers=h(ann), json={"task": t, "tiers": [[1], [0]]}).json() == {
            "stored": True, "duplicate": False}
        assert c.post("/api/label", headers=h(ann), json={"task": t, "tiers": [[0], [1]]}).json()["duplicate"]
        added = c.post("/api/tasks", headers=h(lee), json={"batch": "b2", "kind": "thumbs", "rows": [
            {"prompt": "q", "responses": ["z"]}]}).json()["tasks"]
        assert c.get("/api/next", headers=h(ann)).json()["task"]["task"] == added[0]
        lines = c.get("/api/export/rankings", headers=h(lee)).text.splitlines()
        assert len(lines) == 1 and '"labeler": "ann"' in lines[0]
        assert c.get("/api/report", headers=h(lee)).json()["labelers"]["ann"]["labels"] == 1


def chromium():
    """Headless Chromium from the OS packages (scripts/install.sh installs `chromium` and `chromium-driver`)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    binary, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not (binary and driver):
        pytest.fail("no chromium / chromedriver on PATH: apt-get install chromium chromium-driver "
                    "(scripts/install.sh does where it can)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,900",
                "--disable-gpu", "--no-first-run"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=opts)


def screenshot(browser, tmp_path: Path, name: str) -> None:
    browser.save_screenshot(str(tmp_path / f"{name}.png"))
    if os.environ.get("LABEL_SCREENSHOTS"):
        Path(os.environ["LABEL_SCREENSHOTS"]).mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(Path(os.environ["LABEL_SCREENSHOTS"]) / f"{name}.png"))


def test_a_labeler_ranks_and_thumbs_through_the_page_in_headless_chromium(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    url, store = server
    token, lead = store.add_labeler("ann"), store.add_labeler("lee", lead=True)
    store.add_tasks("demo", [
        {"prompt": "Name a colour of the sky.", "responses": ["Blue.", "The sky is often blue by day.", "Potato."]},
        {"prompt": "Write a greeting.", "responses": ["Hello there!", EVIL, "hi"]},
        {"prompt": "What is 2 + 2?", "responses": ["4", "four", "5", "22"]}])
    store.add_tasks("demo", [{"prompt": "Say something kind.", "responses": ["You did well today.", "Meh."]}],
                    kind="thumbs")
    browser = chromium()
    wait = WebDriverWait(browser, 20)
    try:
        browser.get(f"{url}/#token=not-a-token")
        wait.until(lambda b: "Refused" in b.find_element(By.ID, "message").text)
        assert "no valid token" in browser.find_element(By.ID, "message").text
        assert not browser.find_element(By.ID, "task").is_displayed()

        browser.get(f"{url}/#token={token}")
        clicked_rankings = []                       # what was clicked, as answer texts, tiers best first

        def current():
            wait.until(lambda b: b.find_element(By.ID, "task").is_displayed()
                       and b.find_elements(By.CSS_SELECTOR, "#answers li"))
            prompt = browser.find_element(By.ID, "prompt").text
            texts = [li.find_element(By.TAG_NAME, "pre").text for li in
                     browser.find_elements(By.CSS_SELECTOR, "#answers li")]
            return prompt, texts

        def next_after(prompt):
            wait.until(lambda b: b.find_element(By.ID, "prompt").text != prompt
                       or not b.find_element(By.ID, "task").is_displayed())

        # 1: by keys, the second shown best, then the first; the last one goes last by itself; Enter submits
        prompt, texts = current()
        assert prompt == "Name a colour of the sky." and sorted(texts) == sorted(
            ["Blue.", "The sky is often blue by day.", "Potato."])
        body = browser.find_element(By.TAG_NAME, "body")
        body.send_keys("2")
        body.send_keys("1")
        assert browser.find_element(By.ID, "ranking").text == "B > A > C"
        screenshot(browser, tmp_path, "label_rank")
        body.send_keys(Keys.ENTER)
        clicked_rankings.append((prompt, [[texts[1]], [texts[0]], [texts[2]]]))
        next_after(prompt)

        # 2: the answer holding markup and script is shown as its characters and runs nothing; ranked by clicks
        prompt, texts = current()
        assert prompt == "Write a greeting." and EVIL in texts
        assert browser.execute_script("return window.pwned") is None
        assert not browser.find_elements(By.CSS_SELECTOR, "#answers b, #answers img, #answers script")
        lis = browser.find_elements(By.CSS_SELECTOR, "#answers li")
        order = [texts.index("Hello there!"), texts.index("hi")]
        for i in order:
            lis[i].click()
        assert "ranked" in lis[texts.index(EVIL)].get_attribute("class")        # the one left went last
        screenshot(browser, tmp_path, "label_script_as_text")
        browser.find_element(By.ID, "submit").click()
        clicked_rankings.append((prompt, [["Hello there!"], ["hi"], [EVIL]]))
        next_after(prompt)

        # 3: a tie: shown 3 first; shown 1 and 4 tied; then 2. An undo on the way.
        prompt, texts = current()
        assert prompt == "What is 2 + 2?"
        lis = browser.find_elements(By.CSS_SELECTOR, "#answers li")
        lis[2].click()
        lis[1].click()
        browser.find_element(By.ID, "undo").click()                 # not that one
        lis[0].click()
        browser.find_element(By.ID, "tie").click()
        lis[3].click()
        assert browser.find_element(By.ID, "ranking").text == "C > A = D > B"
        browser.find_element(By.ID, "submit").click()
        clicked_rankings.append((prompt, [[texts[2]], [texts[0], texts[3]], [texts[1]]]))
        next_after(prompt)

        # thumbs: up with a reason (typed: the keys in the box do not label), then down by key
        wait.until(lambda b: b.find_element(By.ID, "thumb-controls").is_displayed())
        assert browser.find_element(By.ID, "prompt").text == "Say something kind."
        first = browser.find_element(By.CSS_SELECTOR, "#answers pre").text
        browser.find_element(By.ID, "reason").send_keys("kind, and sounds sure")
        screenshot(browser, tmp_path, "label_thumbs")
        browser.find_element(By.ID, "up").click()
        wait.until(lambda b: b.execute_script("return document.querySelector('#answers pre').textContent") != first)
        second = browser.find_element(By.CSS_SELECTOR, "#answers pre").text
        browser.find_element(By.TAG_NAME, "body").send_keys("d")
        wait.until(lambda b: "Nothing to label" in b.find_element(By.ID, "message").text)
        assert "you labelled 5" in browser.find_element(By.ID, "progress").text

        browser.get(f"{url}/lead.html#token={lead}")
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#labelers tbody tr")) == 1)
        browser.find_element(By.CSS_SELECTOR, "button[data-kind=rankings]").click()
        wait.until(lambda b: b.find_element(By.ID, "download").is_displayed())
        assert browser.find_element(By.ID, "download").text == "rankings.jsonl (3 rows)"
        screenshot(browser, tmp_path, "label_lead")
    finally:
        browser.quit()

    # the export equals what was clicked
    exported = store.export("rankings")
    got = [(r["prompt"], [[r["responses"][a] for a in t] for t in r["tiers"]]) for r in exported]
    assert got == clicked_rankings
    assert ["ranking" in r for r in exported] == [True, True, False] and sorted(exported[2]["scores"]) == [1, 2, 2, 3]
    thumbs = store.export("thumbs")
    assert [(r["completion"], r["label"], r["reason"]) for r in thumbs] == [
        (first, True, "kind, and sounds sure"), (second, False, "")]
    assert {first, second} == {"You did well today.", "Meh."}
    assert all(r["labeler"] == "ann" for r in exported + thumbs)
    assert all(lab["seconds"] is not None and lab["seconds"] > 0 for lab in store.labels())


def test_rlhf_ray_label_queues_answer_sets_for_people_without_a_judge(tmp_path, capsys):
    """`rlhf-ray label --set label.queue=F`: the answer sets go to the label store as ranking tasks (no judge);
    the same file the page serves. (Sampled answers, label.prompts, take the sampler as the judge path does.)"""
    from launch.label import main
    rows = tmp_path / "answers.jsonl"
    rows.write_text('{"prompt": "p1", "responses": ["a", "b", "c"]}\n{"prompt": "p2", "responses": ["d", "e"]}\n')
    db = tmp_path / "q.sqlite"
    assert main(["--config", "configs/tiny_world.yaml", "--set", f"label.responses={rows}", "--set",
                 f"label.queue={db}", "--set", "label.wanted=2", "--set", f"run.output_dir={tmp_path / 'run'}"]) == 0
    assert f"queued 2 prompts' answers for people in {db}" in capsys.readouterr().out
    tasks = LabelStore(db).batch_tasks("label")
    assert [(t["prompt"], t["answers"]) for t in tasks] == [("p1", ["a", "b", "c"]), ("p2", ["d", "e"])]
    assert LabelStore(db).next_task("x")["task"] == tasks[0]["task"]
