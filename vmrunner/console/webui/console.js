// The console page: the VM's screen through noVNC and its serial port through xterm.js, each on a WebSocket of
// this server, each reconnecting on its own when the VM (or the runner) restarts.
import RFB from "/vendor/novnc/core/rfb.js";
import { Terminal } from "/vendor/xterm/lib/xterm.mjs";
import { FitAddon } from "/vendor/xterm-fit/lib/addon-fit.mjs";

const wsBase = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}`;
const RETRY_FIRST = 1000, RETRY_MAX = 10000;

// X11 keysyms of the keys the combination buttons press.
const KEY = { ctrl: 0xffe3, alt: 0xffe9, del: 0xffff, tab: 0xff09, esc: 0xff1b, enter: 0xff0d, f1: 0xffbe, f2: 0xffbf };
const CODE = { ctrl: "ControlLeft", alt: "AltLeft", del: "Delete", tab: "Tab", esc: "Escape", enter: "Enter",
               f1: "F1", f2: "F2" };

function showState(which, state) {
  const badge = document.getElementById(`${which}-state`);
  badge.dataset.state = state;
  badge.textContent = `${which}: ${state}`;
}

// --- the screen -------------------------------------------------------------------------------------------------
let rfb = null;
let screenRetry = RETRY_FIRST;
let vncPassword = null;

function connectScreen() {
  showState("screen", "connecting");
  rfb = new RFB(document.getElementById("screen"), `${wsBase}/ws/vnc`,
                vncPassword === null ? {} : { credentials: { password: vncPassword } });
  rfb.scaleViewport = true;
  rfb.resizeSession = false;
  rfb.addEventListener("connect", () => { screenRetry = RETRY_FIRST; showState("screen", "connected"); });
  rfb.addEventListener("disconnect", () => {
    showState("screen", "disconnected");
    rfb = null;
    setTimeout(connectScreen, screenRetry);
    screenRetry = Math.min(screenRetry * 2, RETRY_MAX);
  });
  rfb.addEventListener("credentialsrequired", askPassword);
  rfb.addEventListener("securityfailure", () => { vncPassword = null; });
}

function askPassword() {
  const dialog = document.getElementById("vnc-password");
  dialog.onclose = () => {
    vncPassword = document.getElementById("vnc-password-text").value;
    if (rfb) rfb.sendCredentials({ password: vncPassword });
  };
  dialog.showModal();
}

function press(names) {
  if (!rfb) return;
  if (names === "ctrl-alt-del") { rfb.sendCtrlAltDel(); return; }
  const keys = names.split("-");
  for (const k of keys) rfb.sendKey(KEY[k], CODE[k], true);
  for (const k of keys.reverse()) rfb.sendKey(KEY[k], CODE[k], false);
}

// A character as a keysym: Latin-1 maps to itself, the rest of Unicode to 0x01000000 + its code point.
function keysym(ch) {
  if (ch === "\n") return KEY.enter;
  if (ch === "\t") return KEY.tab;
  const cp = ch.codePointAt(0);
  return (cp >= 0x20 && cp <= 0x7e) || (cp >= 0xa0 && cp <= 0xff) ? cp : 0x01000000 + cp;
}

// qemu turns a keysym into the key that carries it, without Shift: the characters a US keyboard types with Shift
// are typed with Shift held, as a person would.
const SHIFTED = /[A-Z~!@#$%^&*()_+{}|:"<>?]/;
const SHIFT = 0xffe1;

function typeOnScreen(text) {
  if (!rfb) return;
  for (const ch of text.replace(/\r\n?/g, "\n")) {
    const sym = keysym(ch);
    const shift = SHIFTED.test(ch);
    if (shift) rfb.sendKey(SHIFT, "ShiftLeft", true);
    rfb.sendKey(sym, null, true);
    rfb.sendKey(sym, null, false);
    if (shift) rfb.sendKey(SHIFT, "ShiftLeft", false);
  }
}

// --- the serial console -----------------------------------------------------------------------------------------
const term = new Terminal({ convertEol: false, scrollback: 5000, cursorBlink: true });
const fit = new FitAddon();
term.loadAddon(fit);
let serial = null;
let serialRetry = RETRY_FIRST;
const encoder = new TextEncoder();

function connectSerial() {
  showState("serial", "connecting");
  const ws = new WebSocket(`${wsBase}/ws/serial`);
  ws.binaryType = "arraybuffer";
  ws.onopen = () => { serial = ws; serialRetry = RETRY_FIRST; showState("serial", "connected"); };
  ws.onmessage = (event) => term.write(new Uint8Array(event.data));
  ws.onclose = () => {
    serial = null;
    showState("serial", "disconnected");
    setTimeout(connectSerial, serialRetry);
    serialRetry = Math.min(serialRetry * 2, RETRY_MAX);
  };
}

function typeOnSerial(text) {
  if (serial) serial.send(encoder.encode(text));
}
term.onData(typeOnSerial);

// --- the page ---------------------------------------------------------------------------------------------------
let visible = "screen";

function show(which) {
  visible = which;
  for (const name of ["screen", "serial"]) {
    document.getElementById(name).hidden = name !== which;
    document.getElementById(`show-${name}`).setAttribute("aria-pressed", String(name === which));
  }
  document.getElementById("screen-keys").hidden = which !== "screen";
  if (which === "serial") { fit.fit(); term.focus(); } else if (rfb) { rfb.focus(); }
}

document.getElementById("show-screen").addEventListener("click", () => show("screen"));
document.getElementById("show-serial").addEventListener("click", () => show("serial"));
for (const button of document.querySelectorAll("[data-keys]")) {
  button.addEventListener("click", () => press(button.dataset.keys));
}
document.getElementById("paste").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = document.getElementById("paste-text");
  (visible === "screen" ? typeOnScreen : typeOnSerial)(input.value + "\n");
  input.value = "";
});
window.addEventListener("resize", () => { if (visible === "serial") fit.fit(); });

term.open(document.getElementById("serial"));
connectScreen();
connectSerial();
if (location.hash === "#serial") show("serial");
