"""Screenshot of the chat page of `babyllama serve` (docs/chat-page.png).

Starts the server in this process on RUN (a chat model: an SFT run), opens the page in headless
Chromium at 900x900, sends Chinese messages one after another (each after the previous answer
has ended), and saves the picture:

    .venv/bin/python docs/screenshot_chat_page.py RUN [--message TEXT] [--out docs/chat-page.png]

Needs the serve and dev extras (uvicorn, fastapi, selenium), Debian's `chromium` and
`chromium-driver`, and a CJK font for the Chinese to show (e.g. fonts-wqy-microhei or
fonts-noto-cjk; without one it is drawn as boxes).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

DOCS = Path(__file__).resolve().parent
SIZE = (900, 900)


def start_server(run: str, device: str):
    """uvicorn with the server's app on a free port, in a daemon thread; returns (url, server, thread)
    once /health answers 200."""
    import uvicorn

    from babyllama.cli.serve import open_socket
    from babyllama.serve.app import create_app
    from babyllama.serve.worker import EngineThread

    engine = EngineThread(run, device=device)
    app = create_app(engine)
    sock = open_socket("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 300
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as response:
                if response.status == 200:
                    return url, server, thread
        except urllib.error.HTTPError as e:
            if e.code != 503:
                raise
            if engine.error:
                sys.exit(f"the model did not load: {engine.error}")
        except (urllib.error.URLError, ConnectionError):
            pass
        if time.monotonic() > deadline or not thread.is_alive():
            sys.exit("the server did not get ready")
        time.sleep(0.2)


def browser(profile: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver_path = shutil.which("chromedriver")
    if not (chromium and driver_path):
        sys.exit("needs chromium and chromedriver (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-dev-shm-usage", "--hide-scrollbars", f"--window-size={SIZE[0]},{SIZE[1]}",
                f"--user-data-dir={profile}"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(driver_path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="an SFT run directory (a chat model)")
    parser.add_argument("--message", action="append",
                        help="a message to send; repeat for several turns (default: two greetings)")
    parser.add_argument("--out", default=str(DOCS / "chat-page.png"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for the answer")
    args = parser.parse_args()

    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    url, server, thread = start_server(args.run, args.device)
    with tempfile.TemporaryDirectory() as profile:
        driver = browser(profile)
        try:
            # The viewport itself at SIZE (the window's frame is not in a headless screenshot).
            driver.get(url + "/")
            width, height = driver.execute_script("return [window.innerWidth, window.innerHeight]")
            driver.set_window_size(2 * SIZE[0] - width, 2 * SIZE[1] - height)
            WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"),
                                            "the page never read /props")
            for turn, message in enumerate(args.message or ["你好", "你喜欢什么书？"], 1):
                box = driver.find_element(By.ID, "input")
                box.send_keys(message)
                box.send_keys(Keys.ENTER)
                WebDriverWait(driver, args.timeout, poll_frequency=0.1).until(
                    lambda d, n=turn: len(d.find_elements(By.CSS_SELECTOR, '#messages .assistant[data-done="true"]')) >= n,
                    "no answer in time")
            time.sleep(0.3)  # let the status line and the caret settle
            for node in driver.find_elements(By.CSS_SELECTOR, "#messages .assistant"):
                print("answer:", node.get_attribute("textContent"))
            print("status:", driver.find_element(By.ID, "status").text)
            errors = driver.find_elements(By.CSS_SELECTOR, "#messages .error")
            if errors:
                sys.exit("the page shows an error: " + errors[0].get_attribute("textContent"))
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_bytes(driver.get_screenshot_as_png())
            print("saved", args.out)
        finally:
            driver.quit()
            server.should_exit = True
            thread.join(10)


if __name__ == "__main__":
    main()
