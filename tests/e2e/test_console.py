"""The console in a real browser: Debian's headless Chromium, driven through chromedriver, against the tiny guest
booted by the real runner (uid 10001, no capabilities, TCG) behind the real sidecar.

Two boots: ``local`` is the default (the console on the pod's localhost only, reached through a port-forward
stand-in that connects from inside the pod's namespace as the kubelet does); ``exposed`` sets CONSOLE_POD_PORT in
both containers with a token. Screenshots of each console land in ``build/screenshots/``.
"""

import base64
import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver

from tests.guest.build import ensure_guest
from tests.harness import pod as harness
from tests.harness import wait
from tests.harness.pod import PodNet, Proc
from tests.harness.portforward import PortForward, free_port
from tests.harness.scenario import BOOT_TIMEOUT, pod_scenario

pytestmark = pytest.mark.guest

CONSOLE_PORT = 6080
WAIT = 30.0
TOKEN = "console-t0ken-e2e-planted"  # noqa: S105 planted to be looked for in the log
VNC_PASSWORD = "vnc-pw-1"  # noqa: S105 a test password
SCREENSHOTS = harness.REPO / "build" / "screenshots"

SHIFTED = {">": ".", "S": "s", "$": "4", "(": "9", ")": "0", "+": "="}  # the US keyboard's keys for these
WS_KEY = base64.b64encode(b"podvm-console-16").decode()


@dataclass
class Pod:
    """One booted guest: its runner, the pod seen from the client namespace, the port-forward's local port."""

    runner: Proc
    net: PodNet
    local: int
    run_dir: Path
    restart: Callable[[], Proc]  # the runner stopped through ACPI and started again, as a container restart does

    @property
    def url(self) -> str:
        """The page as a user opens it after ``kubectl port-forward``."""
        return f"http://localhost:{self.local}/"


@contextlib.contextmanager
def booted(name: str, runner_env: dict[str, str], sidecar_env: dict[str, str]) -> Iterator[Pod]:
    """The guest booted behind the sidecar with these variables, and a port-forward to its console; all removed
    afterwards, also when a test fails."""
    with pod_scenario(f"console-{name}", hostname=f"pet-{name}", image=ensure_guest(), sidecar_env=sidecar_env) as pod:
        env = pod.env(**runner_env)
        current: list[Proc] = []

        def start_runner() -> Proc:
            runner = pod.boot(f"runner-{len(current) + 1}.log", env)
            current.append(runner)
            runner.wait_for("console: http://localhost", WAIT)
            return runner

        def restart() -> Proc:
            assert harness.graceful_stop(current[-1], WAIT) == 0, current[-1].text()
            return start_runner()

        runner = start_runner()
        forward = PortForward(pod.bed.pod.ns, CONSOLE_PORT, pod.base / "port-forward.log").setup()
        assert forward.proc is not None
        pod.procs.append(forward.proc)
        yield Pod(runner, pod.net, forward.local, pod.dirs["run"], restart)


@pytest.fixture(scope="module")
def local() -> Iterator[Pod]:
    """The default: the console on the pod's localhost only, VNC on 5900 without a password."""
    with booted("local", {}, {}) as pod:
        yield pod


@pytest.fixture(scope="module")
def exposed() -> Iterator[Pod]:
    """CONSOLE_POD_PORT=6080 in both containers, with a token in CONSOLE_PASSWORD_FILE, and a VNC password."""
    secrets = Path(tempfile.mkdtemp(prefix="podvm-console-secret-"))
    token_file, vnc_file = secrets / "token", secrets / "vnc"
    token_file.write_text(TOKEN + "\n")
    vnc_file.write_text(VNC_PASSWORD + "\n")
    for path in (secrets, token_file, vnc_file):
        os.chown(path, harness.RUNNER_UID, harness.RUNNER_UID)
    port = {"CONSOLE_POD_PORT": str(CONSOLE_PORT)}
    try:
        runner_env = {**port, "CONSOLE_PASSWORD_FILE": str(token_file), "VNC_PASSWORD_FILE": str(vnc_file)}
        with booted("exposed", runner_env, port) as pod:
            yield pod
    finally:
        shutil.rmtree(secrets, ignore_errors=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    """Debian's Chromium, headless, through Debian's chromedriver (nothing downloaded)."""
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-proxy-server", "--window-size=1000,640"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def until(what: str, check: Callable[[], object], timeout: float = WAIT) -> object:
    """``wait.until`` with this module's patience for a browser."""
    return wait.until(what, check, timeout, 0.2)


def state(driver: WebDriver, which: str) -> str:
    """The page's connection badge of one console (connecting, connected, disconnected)."""
    return str(driver.find_element(By.ID, f"{which}-state").get_attribute("data-state"))


def terminal_text(driver: WebDriver) -> str:
    """What xterm.js shows (its visible rows)."""
    return str(driver.execute_script("return document.querySelector('#serial .xterm-rows').innerText"))


def lit_pixels(driver: WebDriver) -> int:
    """How many pixels of noVNC's canvas are not black."""
    script = """
        const c = document.querySelector('#screen canvas');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 0; i < d.length; i += 4) if (d[i] + d[i + 1] + d[i + 2] > 60) n++;
        return n;"""
    return int(driver.execute_script(script))


def screenshot(driver: WebDriver, name: str) -> None:
    """A test artefact: the page as it looks now."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))


def open_console(driver: WebDriver, pod: Pod) -> None:
    """Load the page and wait until both consoles are connected."""
    driver.get(pod.url)
    until("connected screen", lambda: state(driver, "screen") == "connected")
    until("connected serial console", lambda: state(driver, "serial") == "connected")


def type_serial(driver: WebDriver, text: str) -> None:
    """Type ``text`` and Enter into the xterm, as a person does."""
    driver.find_element(By.ID, "show-serial").click()
    area = driver.find_element(By.CSS_SELECTOR, "#serial .xterm-helper-textarea")
    area.send_keys(text + Keys.ENTER)


def curl(pod: Pod, *args: str) -> str:
    """curl run in the client namespace (outside the pod): the status line and headers it got, or its failure."""
    done = harness.in_ns(pod.net.client_ns, ["curl", "-s", "-i", "--max-time", "4", *args])
    return done.stdout.decode(errors="replace") or f"curl exit {done.returncode}"


def local_curl(*args: str) -> str:
    """curl through the port-forward, as a program on the operator's machine."""
    done = subprocess.run(
        ["curl", "-s", "-i", "--noproxy", "*", "--max-time", "4", *args], capture_output=True, check=False
    )
    return done.stdout.decode(errors="replace") or f"curl exit {done.returncode}"


def upgrade(origin: str | None) -> list[str]:
    """curl arguments of a WebSocket upgrade, with ``origin`` (None: no Origin header)."""
    headers = ["Connection: Upgrade", "Upgrade: websocket", "Sec-WebSocket-Version: 13", f"Sec-WebSocket-Key: {WS_KEY}"]
    if origin is not None:
        headers.append(f"Origin: {origin}")
    return [arg for header in headers for arg in ("-H", header)]


def status_of(response: str) -> int:
    """The HTTP status of curl's ``-i`` output."""
    return int(response.split(" ", 2)[1]) if response.startswith("HTTP/") else 0


# --- the default: localhost only ----------------------------------------------------------------------------------


def test_page_loads_through_the_port_forward_and_not_from_the_pod_ip(local: Pod, browser: WebDriver) -> None:
    """Both consoles connect through the port-forward; on the pod IP port 6080 is the guest's (the DNAT sends it
    to the VM, which has nothing there), and 5900 is still qemu's VNC as configured."""
    open_console(browser, local)
    assert browser.title == "podvm console"
    on_pod_ip = curl(local, f"http://{local.net.pod_ip}:{CONSOLE_PORT}/")
    assert "podvm console" not in on_pod_ip and status_of(on_pod_ip) == 0, on_pod_ip
    assert harness.is_vnc_banner(harness.vnc_banner(local.net))


def test_typed_text_reaches_the_guests_shell_and_its_answer_appears(local: Pod, browser: WebDriver) -> None:
    """A command typed into the xterm runs in the guest's serial shell; the answer shows in the page and, complete,
    in the runner's log."""
    open_console(browser, local)
    type_serial(browser, "echo serial-$((6*7))-answer")
    until("the guest's answer in the xterm", lambda: "serial-42-answer" in terminal_text(browser))
    local.runner.wait_for(r"guest: .*serial-42-answer", WAIT)
    screenshot(browser, "serial-console")


def test_the_screen_connects_shows_the_guest_and_takes_keystrokes(local: Pod, browser: WebDriver) -> None:
    """noVNC connects to qemu's display through the WebSocket, the canvas shows the guest's screen, and keys pressed
    on the canvas reach the shell on the guest's first virtual terminal (its answer goes to the serial port)."""
    open_console(browser, local)
    until("a lit canvas", lambda: lit_pixels(browser) > 500)  # the guest's screen has arrived
    screenshot(browser, "screen-before-keys")
    canvas = browser.find_element(By.CSS_SELECTOR, "#screen canvas")
    keys = ActionChains(browser).click(canvas)
    for char in "echo screen-$((5+3))-keys >/dev/ttyS0":
        # chromedriver types a character without pressing Shift; a person holds it (qemu's keys are the keyboard's)
        keys = (
            keys.key_down(Keys.SHIFT).send_keys(SHIFTED[char]).key_up(Keys.SHIFT)
            if char in SHIFTED
            else keys.send_keys(char)
        )
    keys.send_keys(Keys.ENTER).perform()
    local.runner.wait_for(r"guest: .*screen-8-keys", WAIT)
    # The paste box types a line as key presses.
    browser.find_element(By.ID, "paste-text").send_keys("echo pasted-$((9*9)) >/dev/ttyS0" + Keys.ENTER)
    local.runner.wait_for(r"guest: .*pasted-81", WAIT)
    screenshot(browser, "screen")


def test_two_viewers_and_vmrunner_console_share_the_serial_port(local: Pod, browser: WebDriver) -> None:
    """Two browser tabs and ``vmrunner console`` attached at once: what one types, all three see."""
    open_console(browser, local)
    first = browser.current_window_handle
    browser.switch_to.new_window("tab")
    open_console(browser, local)
    terminal = subprocess.Popen(
        ["setpriv", "--reuid", str(harness.RUNNER_UID), "--regid", str(harness.RUNNER_UID), "--clear-groups",
         str(harness.BIN / "vmrunner"), "console"],
        env=harness.base_env(RUN_DIR=str(local.run_dir)),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert terminal.stdin is not None and terminal.stdout is not None
        os.set_blocking(terminal.stdout.fileno(), False)
        terminal.stdin.write(b"echo trio-$((2*50))\n")
        terminal.stdin.flush()
        seen = bytearray()

        def terminal_saw() -> bool:
            assert terminal.stdout is not None
            seen.extend(terminal.stdout.read() or b"")
            return b"trio-100" in seen

        until("the answer in vmrunner console", terminal_saw)
        until("the answer in the second tab", lambda: "trio-100" in terminal_text_after_switch(browser))
        browser.switch_to.window(first)
        until("the answer in the first tab", lambda: "trio-100" in terminal_text_after_switch(browser))
    finally:
        terminal.kill()
        terminal.wait()
        for handle in browser.window_handles[1:]:
            browser.switch_to.window(handle)
            browser.close()
        browser.switch_to.window(browser.window_handles[0])
    local.runner.wait_for(r"guest: .*trio-100", WAIT)


def terminal_text_after_switch(driver: WebDriver) -> str:
    """The xterm's text of the current tab, its serial console shown."""
    driver.find_element(By.ID, "show-serial").click()
    return terminal_text(driver)


def test_a_foreign_host_name_is_refused(local: Pod) -> None:
    """DNS rebinding: a name of the attacker's that resolves to 127.0.0.1 reaches the port-forward, but the server
    answers only to localhost names."""
    url = f"http://127.0.0.1:{local.local}/"
    assert status_of(local_curl(url)) == 200
    for host in ("attacker.example", f"attacker.example:{local.local}", "localhost.attacker.example"):
        assert status_of(local_curl("-H", f"Host: {host}", url)) == 421, host
    assert status_of(local_curl("-H", "Host: attacker.example", *upgrade(None), f"{url}ws/serial")) == 421


def test_a_websocket_from_another_site_is_refused(local: Pod, browser: WebDriver) -> None:
    """Cross-site WebSocket hijacking: a page of another origin, open in the same browser while the port-forward
    runs, cannot open either console's WebSocket; a forged Origin from a program is refused too."""
    url = f"http://localhost:{local.local}/ws/"
    for origin in ("http://attacker.example", f"http://localhost:{local.local + 1}", "null", None):
        for path in ("serial", "vnc"):
            assert status_of(local_curl(*upgrade(origin), url + path)) == 403, (origin, path)
    assert status_of(local_curl(*upgrade(f"http://localhost:{local.local}"), url + "serial")) == 101
    # A real page on another origin (another port of localhost) in the real browser.
    site = Path(tempfile.mkdtemp(prefix="podvm-attacker-"))
    attacker_port = free_port()
    (site / "index.html").write_text(
        "<!doctype html><title>attacker</title><script>"
        f"const ws = new WebSocket('ws://localhost:{local.local}/ws/serial');"
        "ws.onopen = () => { document.title = 'opened'; ws.send('echo hijacked\\n'); };"
        "ws.onerror = () => { document.title = 'refused'; };</script>"
    )
    server = harness.start(
        "attacker",
        ["python3", "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(site), str(attacker_port)],
        harness.base_env(),
        site / "server.log",
    )
    try:
        until("the attacker's page", lambda: status_of(local_curl(f"http://127.0.0.1:{attacker_port}/")) == 200)
        browser.get(f"http://127.0.0.1:{attacker_port}/")
        until("the attacker's verdict", lambda: browser.title in ("opened", "refused"))
        assert browser.title == "refused"
    finally:
        server.kill()
        shutil.rmtree(site, ignore_errors=True)
    assert "hijacked" not in local.runner.text()
    assert "refused GET /ws/serial from origin 'http://127.0.0.1:" in local.runner.text()


def test_the_page_reconnects_when_the_vm_restarts(local: Pod, browser: WebDriver) -> None:
    """The runner stops the guest (ACPI) and starts again, as when its container restarts: the open page shows the
    consoles disconnected, then connected again by itself, and typing works on the new run. Last of its module."""
    open_console(browser, local)
    local.runner = local.restart()
    until("the screen reconnected", lambda: state(browser, "screen") == "connected", BOOT_TIMEOUT)
    until("the serial console reconnected", lambda: state(browser, "serial") == "connected", BOOT_TIMEOUT)
    assert "console: screen viewer attached" in local.runner.text()
    type_serial(browser, "echo again-$((3*4))")
    local.runner.wait_for(r"guest: .*again-12", WAIT)


# --- exposed on the pod IP with a token ---------------------------------------------------------------------------


def test_exposed_console_needs_the_token(exposed: Pod) -> None:
    """On the pod IP the page is the login form; the WebSockets need a session; a wrong or missing token gets none;
    the right one gets an HttpOnly, SameSite=Strict cookie that opens the WebSocket."""
    base = f"http://{exposed.net.pod_ip}:{CONSOLE_PORT}"
    origin = ["-H", f"Origin: {base}"]
    page = curl(exposed, f"{base}/")
    assert status_of(page) == 200 and 'name="token"' in page and "console.js" not in page, page
    assert status_of(curl(exposed, *upgrade(base), f"{base}/ws/serial")) == 401
    assert status_of(curl(exposed, *upgrade(base), f"{base}/ws/vnc")) == 401
    for wrong in ("", "console-t0ken-e2e-plantes", TOKEN + "x"):
        refused = curl(exposed, *origin, "--data-urlencode", f"token={wrong}", f"{base}/login")
        assert status_of(refused) == 403 and "set-cookie" not in refused.lower(), wrong
    assert status_of(curl(exposed, "-H", "Origin: http://attacker.example", "--data-urlencode", f"token={TOKEN}",
                          f"{base}/login")) == 403  # fmt: skip
    granted = curl(exposed, *origin, "--data-urlencode", f"token={TOKEN}", f"{base}/login")
    assert status_of(granted) == 303, granted
    [cookie_line] = [line for line in granted.splitlines() if line.lower().startswith("set-cookie:")]
    assert "HttpOnly" in cookie_line and "SameSite=Strict" in cookie_line
    cookie = cookie_line.split(":", 1)[1].split(";", 1)[0].strip()
    assert status_of(curl(exposed, "-b", cookie, *upgrade(base), f"{base}/ws/serial")) == 101
    assert status_of(curl(exposed, "-b", "podvm_console=forged", *upgrade(base), f"{base}/ws/serial")) == 401
    assert TOKEN not in exposed.runner.text()


def test_exposed_console_logs_in_through_the_browser(exposed: Pod, browser: WebDriver) -> None:
    """The login form in the browser: a wrong token shows the form again; the right one opens the page, whose serial
    console connects and whose screen asks for the VNC password (qemu checks it on the Unix display too)."""
    browser.delete_all_cookies()
    browser.get(exposed.url)
    browser.find_element(By.ID, "token").send_keys("not-the-token-at-all" + Keys.ENTER)
    until("the form again", lambda: browser.find_elements(By.ID, "token"))
    screenshot(browser, "login")
    browser.find_element(By.ID, "token").send_keys(TOKEN + Keys.ENTER)
    until("the console page", lambda: browser.find_elements(By.ID, "serial-state"))
    until("connected serial console", lambda: state(browser, "serial") == "connected")
    dialog = browser.find_element(By.ID, "vnc-password")
    until("the VNC password dialog", lambda: dialog.get_attribute("open") is not None)
    assert state(browser, "screen") != "connected"
    browser.find_element(By.ID, "vnc-password-text").send_keys(VNC_PASSWORD + Keys.ENTER)
    until("connected screen", lambda: state(browser, "screen") == "connected")
    assert TOKEN not in exposed.runner.text() and VNC_PASSWORD not in exposed.runner.text()
