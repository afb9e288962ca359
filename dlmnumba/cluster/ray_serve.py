"""Scale-out on Ray Serve: the same FastAPI app (server/app.py) as replicas of one deployment.

Ray Serve routes each HTTP request to the replica with the fewest ongoing requests, restarts
replicas that die and autoscales on ongoing requests per replica; we write no router.  Each
replica is one Ray actor that builds the app with `build_app` (the model loaded once, before
the replica reports ready) and pins its compute threads (`cluster.threads_per_replica`,
default: the node's physical cores divided by its replicas; the actor asks Ray for as many
CPUs, so replicas on one node do not oversubscribe it).  The engine, prefix cache and metrics
are per replica.

    dlmnumba serve --backend ray --replicas 2 --threads-per-replica 1   # local Ray, 127.0.0.1
    dlmnumba serve --backend ray --ray-address auto --replicas 2 --max-replicas 16
"""
from __future__ import annotations

import dataclasses
import signal
import threading
from typing import Callable

from ..errors import DlmError
from ..kernels.cpu import physical_cores
from ..server.app import create_app
from ..server.build import load_model, server_state

INSTALL_HINT = "pip install -e '.[cluster]'"
DEPLOYMENT = "dlmnumba"


def require_ray():
    """(ray, ray.serve), or a one-line error naming the install command."""
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise DlmError(f"--backend ray needs Ray Serve, which is not installed ({e}); install "
                       f"it with: {INSTALL_HINT}") from None
    return ray, serve


def replica_threads(cfg) -> int:
    """Compute threads of each replica."""
    c = cfg.cluster
    if c.threads_per_replica is not None:
        return c.threads_per_replica
    return max(1, physical_cores() // c.replicas)


def build_app(cfg):
    """On a replica: the server app with its model loaded (the replica is ready after this)."""
    state = server_state(cfg)
    state.attach(load_model(cfg))
    return create_app(state)


def application(cfg):
    """The Ray Serve application of a resolved Config (one deployment, the app as ingress)."""
    _, serve = require_ray()
    c, sc = cfg.cluster, cfg.scheduler
    rcfg = dataclasses.replace(cfg, threads=replica_threads(cfg))
    options = dict(ray_actor_options={"num_cpus": rcfg.threads},
                   max_ongoing_requests=sc.max_sequences + sc.max_waiting,
                   health_check_period_s=2, graceful_shutdown_timeout_s=3)
    if c.max_replicas is not None:
        options["autoscaling_config"] = {"min_replicas": c.replicas,
                                         "max_replicas": c.max_replicas,
                                         "target_ongoing_requests": sc.max_sequences}
    else:
        options["num_replicas"] = c.replicas

    def builder():
        return build_app(rcfg)

    @serve.ingress(builder)
    class DlmReplica:
        """One replica: the dlmnumba server app."""

    return serve.deployment(name=DEPLOYMENT, **options)(DlmReplica).bind()


def start(cfg, note: Callable[[str], None] = lambda _: None) -> None:
    """Start (or join) Ray and run the deployment; returns once every replica is ready."""
    ray, serve = require_ray()
    kw = dict(include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    if cfg.cluster.ray_address is None:
        kw["_node_ip_address"] = "127.0.0.1"  # a local Ray listens on loopback only
    ray.init(address=cfg.cluster.ray_address, **kw)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    c = cfg.cluster
    layout = (f"{c.replicas}..{c.max_replicas} replicas (autoscaled)"
              if c.max_replicas is not None else f"{c.replicas} replicas")
    note(f"starting {layout} x {replica_threads(cfg)} threads on Ray; loading the model ...")
    serve.run(application(cfg), name=DEPLOYMENT, route_prefix="/", blocking=False)


def stop() -> None:
    """Remove the deployment and disconnect (a local Ray is shut down)."""
    ray, serve = require_ray()
    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def serve_ray(cfg, log_level: str = "info", note: Callable[[str], None] = lambda _: None
              ) -> None:
    """Serve on Ray until Ctrl-C / SIGTERM."""
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    start(cfg, note)
    note(f"serving on http://{cfg.host}:{cfg.port} (Ray Serve)")
    try:
        done.wait()
    finally:
        note("stopping ...")
        stop()
