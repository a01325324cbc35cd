"""What ``swarm generate`` and ``swarm serve-api`` run: a client of the swarm plus the model's text codec."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import torch
from rich.console import Console
from rich.markup import escape

from core.config import SwarmSettings
from core.errors import ConfigError
from trainer.model import SwarmModelForCausalLM
from swarm.text import StopScanner, StreamDecoder, TextCodec, load_codec

if TYPE_CHECKING:
    from bootstrap.state import StateDB

__all__ = ["codec_of", "model_id_of", "stream_text", "serve_api", "api_readiness"]

logger = logging.getLogger(__name__)


def codec_of(model: SwarmModelForCausalLM) -> TextCodec:
    """The model's tokenizer or the byte-level convention (``NoTokenizer`` otherwise; see ``swarm.text``)."""
    source = model.source
    return load_codec(source.root if source else None, model.local.config,
                      repo_id=source.repo_id if source else None)


def model_id_of(model: SwarmModelForCausalLM) -> str:
    """The id API clients send: a hub model's repo id, a local directory's name."""
    name = model.manifest.model
    path = Path(name)
    return path.name if path.is_absolute() or path.exists() else name


def stream_text(model: SwarmModelForCausalLM, codec: TextCodec, prompt: str, *, out: TextIO = sys.stdout,
                max_new_tokens: int, temperature: float, top_k: int, top_p: float, seed: int | None,
                stops: tuple[str, ...] = ()) -> tuple[str, int, float]:
    """Generate after ``prompt`` and write the text to ``out`` as each token arrives.
    Returns (the generated text, tokens generated, seconds)."""
    ids = codec.encode(prompt)
    if not ids:
        raise ConfigError("the prompt is empty")
    eos = {codec.eos_token_id} - {None}
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    sampling = dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p) if temperature > 0 else {}
    decoder, scanner = StreamDecoder(codec), StopScanner(stops)
    shown, count, started = 0, 0, time.perf_counter()
    tokens = model.iter_generate(torch.tensor([ids]), generator=generator, max_new_tokens=max_new_tokens, **sampling)
    try:
        for step in tokens:
            count += 1
            if int(step[0]) in eos:
                break
            decoder.push(int(step[0]))
            cut = scanner.find(decoder.text)
            visible = decoder.text[:cut] if cut is not None else decoder.text[:decoder.emitted]
            limit = len(visible) if cut is not None else scanner.safe(visible)
            out.write(visible[shown:limit])
            out.flush()
            shown = max(shown, limit)
            if cut is not None:
                break
    finally:
        tokens.close()
    text = decoder.text
    cut = scanner.find(text)
    text = text if cut is None else text[:cut]
    out.write(text[shown:])
    out.flush()
    return text, count, time.perf_counter() - started


def api_readiness(model: SwarmModelForCausalLM, timeout: float = 10.0) -> dict[str, bool]:
    """``/ready`` of serve-api: the DHT is up, every stage has an online peer (a request could be
    routed), and a bootstrap of the run announced itself within its record's lifetime."""
    from dht.control import get_bootstraps
    from dht.schemas import PeerState

    dht = model.dht
    if dht is None or not dht.dht.is_alive():
        return {"dht": False, "stages": False, "bootstrap": False}
    records = model.submit(dht.all_records(model.manifest.num_stages)).result(timeout)
    bootstraps = model.submit(get_bootstraps(dht)).result(timeout)
    return {"dht": True, "stages": all(any(r.state == PeerState.ONLINE for r in found) for found in records.values()),
            "bootstrap": bool(bootstraps)}


def serve_api(settings: SwarmSettings, console: Console, *, run_keys: StateDB | None = None) -> None:
    """Connect to the swarm, then serve the OpenAI-compatible API until Ctrl+C / SIGTERM. With
    ``run_keys`` (the bootstrap's state database) the run's API keys are accepted too."""
    import uvicorn

    from swarm.api import AnyOf, RateLimits, RunKeys, StaticKeys, SwarmKeys, create_app
    from core.errors import NoTokenizer

    with console.status("joining the swarm and loading the local layers..."):
        model = SwarmModelForCausalLM.from_pretrained(initial_peers=settings.network.initial_peers,
                                                     run_id=settings.run_id, timeout=settings.trainer.timeout,
                                                     key=settings.key, device=settings.trainer.device)
    with model:
        try:
            codec: TextCodec | None = codec_of(model)
        except NoTokenizer as e:
            console.print(f"[yellow]no text:[/] {escape(str(e))}; completions will be refused, embeddings take token ids")
            codec = None
        api = settings.api
        model_id = api.model_name or model_id_of(model)
        keys = AnyOf(StaticKeys(api.api_keys), SwarmKeys(model.run_auth, model.loop),
                     *([RunKeys(run_keys)] if run_keys is not None else []))
        limits = RateLimits(api.requests_per_minute, api.tokens_per_minute, api.max_concurrent)
        app = create_app(model, codec, model_id=model_id, keys=keys, aliases=[model.manifest.model], limits=limits,
                         checks=lambda: api_readiness(model))
        server = uvicorn.Server(uvicorn.Config(app, host=api.host, port=api.port, log_level="warning",
                                               lifespan="off", proxy_headers=True, **api.tls()))
        scheme = "https" if api.tls() else "http"
        console.print(f"[bold green]serving[/] model [cyan]{escape(model_id)}[/] at {scheme}://{api.host}:{api.port}/v1 "
                      f"({'API keys required' if keys.enforced() else 'no API key needed'}); Ctrl+C to stop")
        try:
            server.run()
        except KeyboardInterrupt:  # uvicorn re-raises the Ctrl+C it handled once it has shut down
            pass
        console.print("stopping the API server...")
