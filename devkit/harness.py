"""A real ComfyUI server on loopback with this pack loaded from the checkout, driven the way users drive it:
API-format graphs posted to /prompt, results followed on /history and the websocket.

Used by the host tests (tests/host/) and by scripts/generate.py. No stand-in for ComfyUI's engine.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACK_NAME = "comfyui-newbie-lowvram"
FAULT_NODES = REPO / "devkit" / "fault_nodes"  # test-only nodes that inject out-of-memory errors (devkit/faults.py)
PROFILE_NODES = REPO / "devkit" / "profile_nodes"  # bench-only node that profiles a sampling run in the server


def find_hosts() -> dict[str, Path | None]:
    """The primary host (v0.33.0 line) and the legacy lane (v0.8.0)."""
    primary = None
    for cand in (os.environ.get("COMFYUI_PATH"), str(Path.home() / "comfy" / "ComfyUI"), str(REPO.parents[1])):
        if cand and (Path(cand) / "main.py").exists() and (Path(cand) / "comfy").is_dir():
            primary = Path(cand)
            break
    legacy = os.environ.get("COMFYUI_LEGACY_PATH") or str(Path.home() / "comfy" / "ComfyUI-v0.8.0")
    legacy = Path(legacy) if (Path(legacy) / "main.py").exists() else None
    return {"v0.33": primary, "v0.8": legacy}


def where_looked() -> str:
    return ("COMFYUI_PATH={!r}, ~/comfy/ComfyUI, the ComfyUI containing this checkout ({}); legacy lane: "
            "COMFYUI_LEGACY_PATH={!r}, ~/comfy/ComfyUI-v0.8.0").format(
        os.environ.get("COMFYUI_PATH"), REPO.parents[1], os.environ.get("COMFYUI_LEGACY_PATH"))


def host_version(comfy_dir: Path) -> str:
    text = (comfy_dir / "comfyui_version.py").read_text()
    return text.split("__version__")[1].split('"')[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PromptFailed(Exception):
    def __init__(self, message: str, details: dict):
        super().__init__(message)
        self.details = details


class ComfyServer:
    """Start with `start()`, stop with `stop()`; everything it writes goes under `workdir`. `extra_nodes`:
    folders of custom nodes loaded beside the pack (e.g. FAULT_NODES), for this server only. `env`: environment
    variables set for the server process only."""

    def __init__(self, comfy_dir: Path, workdir: Path, models_root: Path, extra_args=(), cpu=True, extra_nodes=(),
                 env=None):
        self.comfy_dir = Path(comfy_dir)
        self.extra_nodes = [Path(p) for p in extra_nodes]
        self.workdir = Path(workdir)
        self.models_root = Path(models_root)
        self.extra_args = list(extra_args)
        self.cpu = cpu
        self.env = dict(env or {})
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.log_path = self.workdir / "server.log"
        self.client_id = uuid.uuid4().hex
        self.output_dir = self.workdir / "output"

    # -- life cycle -------------------------------------------------------------------------------------
    def _write_config(self) -> Path:
        custom = self.workdir / "custom_nodes"
        custom.mkdir(parents=True, exist_ok=True)
        for name, target in ((PACK_NAME, REPO), *((f"{PACK_NAME}-{p.name}", p) for p in self.extra_nodes)):
            link = custom / name
            if not link.exists():
                link.symlink_to(target, target_is_directory=True)
        cfg = self.workdir / "extra_model_paths.yaml"
        lines = ["newbie_tests:", f"    base_path: {self.models_root}"]
        for folder in ("diffusion_models", "text_encoders", "vae", "diffusers", "loras", "checkpoints"):
            (self.models_root / folder).mkdir(parents=True, exist_ok=True)
            lines.append(f"    {folder}: {folder}")
        lines += ["pack_under_test:", f"    custom_nodes: {custom}"]
        cfg.write_text("\n".join(lines) + "\n")
        return cfg

    def start(self, timeout: float = 180.0) -> "ComfyServer":
        for sub in ("output", "input", "user", "frontend"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        # A placeholder web root: the API is what these tests use (the browser tests serve the real front end).
        (self.workdir / "frontend" / "index.html").write_text("<html><body>ComfyUI API</body></html>")
        cmd = [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(self.port),
               "--output-directory", str(self.workdir / "output"), "--input-directory", str(self.workdir / "input"),
               "--user-directory", str(self.workdir / "user"),
               "--extra-model-paths-config", str(self._write_config()),
               "--database-url", "sqlite:///:memory:", "--disable-auto-launch"]
        if self.cpu:
            cmd.append("--cpu")
        if not any(a.startswith("--front-end-root") for a in self.extra_args) and "--real-front-end" not in self.extra_args:
            cmd += ["--front-end-root", str(self.workdir / "frontend")]
        cmd += [a for a in self.extra_args if a != "--real-front-end"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_dir, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}; log:\n{self.log_tail()}")
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout} s; log:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    # -- HTTP -------------------------------------------------------------------------------------------
    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def queue(self, graph: dict) -> str:
        status, body = self.post("/prompt", {"prompt": graph, "client_id": self.client_id})
        if status != 200:
            raise PromptFailed(f"/prompt refused the graph ({status}): {json.dumps(body)[:2000]}", body)
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                entry = hist[prompt_id]
                if entry["status"].get("status_str") == "success":
                    return entry
                raise PromptFailed(self.error_text(entry), entry)
            if not self.alive():
                raise RuntimeError(f"ComfyUI died while running {prompt_id}; log:\n{self.log_tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s; log:\n{self.log_tail()}")

    def run(self, graph: dict, timeout: float = 600.0) -> dict:
        return self.wait(self.queue(graph), timeout)

    def run_with_events(self, graph: dict, timeout: float = 600.0) -> tuple[dict, list]:
        """Run a graph while listening on the websocket; returns (history entry, websocket messages)."""
        import websocket  # websocket-client

        ws = websocket.create_connection(f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}", timeout=timeout)
        events: list = []
        done = threading.Event()

        def listen():
            while not done.is_set():
                try:
                    msg = ws.recv()
                except Exception:
                    return
                if isinstance(msg, str) and msg:
                    event = json.loads(msg)
                    event["_t"] = time.perf_counter()
                    events.append(event)
                else:
                    events.append({"type": "binary", "bytes": len(msg)})

        t = threading.Thread(target=listen, daemon=True)
        t.start()
        try:
            entry = self.run(graph, timeout)
            time.sleep(0.3)
            return entry, events
        finally:
            done.set()
            ws.close()
            t.join(5)

    @staticmethod
    def error_text(entry: dict) -> str:
        for kind, data in entry.get("status", {}).get("messages", []):
            if kind == "execution_error":
                return f"{data.get('node_type')}: {data.get('exception_type')}: {data.get('exception_message')}"
        return json.dumps(entry.get("status"))[:2000]

    def output_images(self, entry: dict) -> list[Path]:
        paths = []
        for node_out in entry.get("outputs", {}).values():
            for img in node_out.get("images", []):
                if img.get("type") == "output":
                    paths.append(self.output_dir / img.get("subfolder", "") / img["filename"])
        return paths
