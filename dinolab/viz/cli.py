"""``dinolab viz pca|match|attention`` and ``dinolab serve``: one library call each."""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path

from dinolab.viz.attention import AttentionConfig, class_attention, save_attention_figure
from dinolab.viz.explorer import ExplorerConfig
from dinolab.viz.matching import MatchConfig, match_images, save_match_figure
from dinolab.models.resolve import resolve_backbone
from dinolab.viz.pca import SCOPES, SIGN_RULES, PCAConfig, pca_maps, save_pca_figure
from dinolab.viz.serve import ServeConfig, serve


def _check_images(paths: list[str]) -> None:
    """Each input must be an image file PIL can open (its header only: no decoding), before any work."""
    from PIL import Image, UnidentifiedImageError

    from dinolab.data.images import IMAGE_EXTENSIONS

    for p in paths:
        if not Path(p).exists():
            raise FileNotFoundError(f"image {p} does not exist")
        if not Path(p).is_file():  # a folder, a FIFO (opening it would block) ...
            kind = "a folder" if Path(p).is_dir() else "not a regular file"
            raise ValueError(f"{p} is {kind}; expected an image file")
        try:
            with Image.open(p):
                pass
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
            why = "not an image" if isinstance(err, UnidentifiedImageError) else f"unreadable: {err}"
            raise ValueError(f"{p} is {why} (expected an image: {', '.join(IMAGE_EXTENSIONS)})") from None


def _check_port(host: str, port: int) -> None:
    """Refuse, before the model is loaded, an address the server cannot listen on (a busy port)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, addr = infos[0]
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as http.server does
            sock.bind(addr)
    except socket.gaierror as err:
        raise ValueError(f"--host {host}: unknown address ({err.strerror})") from None
    except OSError as err:
        raise ValueError(_listen_error(err, host, port)) from None


def _model(args: argparse.Namespace):
    """The backbone of ``--run``/``--weights``/``--arch`` in eval mode; fills ``args.size`` when not given: the
    command's default scaled to the model (``default_size / 224`` times its input size, in whole patches)."""
    if not args.weights and not args.run:
        print(f"dinolab: no --weights or --run given: {args.arch or 'vits14'} is randomly initialised, the maps "
              "show noise", file=sys.stderr)
    resolved = resolve_backbone(weights=args.weights, run=args.run, arch=args.arch)
    if args.size is None:
        patch = resolved.model.patch_size
        args.size = patch * max(1, round(resolved.input_size * args.default_size / 224 / patch))
    return resolved.model.eval()


def _add_model_args(p: argparse.ArgumentParser, size: int) -> None:
    p.add_argument("--arch", default=None, help="backbone name (vits14, vitb14_reg, ...); default: read off "
                   "--weights (auto), or vits14 randomly initialised without weights")
    p.add_argument("--weights", default=None, help="local .pth/.safetensors weights (default: random init)")
    p.add_argument("--run", default=None, help="a training run folder: its exported teacher and crop size")
    p.add_argument("--size", type=int, default=None,
                   help=f"shorter image side in pixels; default: {size} for a model made for 224 px (patch 14), "
                        "scaled to the model's own input size otherwise (e.g. a run's 32-px crops)")
    p.set_defaults(default_size=size)


def _add_foreground_args(p: argparse.ArgumentParser) -> None:
    d = PCAConfig()
    p.add_argument("--threshold", type=float, default=d.threshold,
                   help=f"foreground if the first PCA component, in std units, is above this [{d.threshold}]")
    p.add_argument("--sign", choices=SIGN_RULES, default=d.sign,
                   help="orient the first component: border = border patches are background [border]")
    p.add_argument("--no-foreground", action="store_true", help="keep every patch (no first-component threshold)")


def _pca_config(args: argparse.Namespace, **extra) -> PCAConfig:
    return PCAConfig(size=args.size, foreground=not args.no_foreground, threshold=args.threshold,
                     sign=args.sign, **extra)


def run_pca(args: argparse.Namespace) -> int:
    _check_images(args.images)
    model = _model(args)
    cfg = _pca_config(args, scope=args.scope)
    maps = pca_maps(model, args.images, cfg)
    out = save_pca_figure(maps, args.out, names=[Path(p).name for p in args.images], upsample=cfg.upsample)
    print(out)
    return 0


def run_match(args: argparse.Namespace) -> int:
    _check_images([args.image_a, args.image_b])
    model = _model(args)
    cfg = MatchConfig(size=args.size, max_matches=args.max_matches, nms_radius=args.nms_radius,
                      foreground=_pca_config(args))
    a, b, matches = match_images(model, args.image_a, args.image_b, cfg)
    names = (Path(args.image_a).name, Path(args.image_b).name)
    print(save_match_figure(a.image, b.image, matches, model.patch_size, args.out, names))
    return 0


def run_attention(args: argparse.Namespace) -> int:
    _check_images([args.image])
    model = _model(args)
    cfg = AttentionConfig(size=args.size, show_registers=args.show_registers)
    att = class_attention(model, args.image, cfg.size)
    print(save_attention_figure(att, args.out, cfg))
    return 0


_LISTEN_ERRNOS = (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL)


def _listen_error(err: OSError, host: str, port: int) -> str:
    if err.errno == errno.EADDRINUSE:
        return f"port {port} on {host} is already in use: pick another with --port (--port 0: any free port)"
    if err.errno == errno.EACCES:
        return f"port {port} on {host}: permission denied (ports below 1024 need privileges): use --port 8000 or higher"
    return f"cannot listen on {host}:{port}: {err.strerror or err}"


def run_serve(args: argparse.Namespace) -> int:
    if not Path(args.root).is_dir():
        raise FileNotFoundError(f"--root {args.root} is not a folder")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} must be in [0, 65535]")
    _check_port(args.host, args.port)
    model = _model(args)
    explorer = ExplorerConfig(size=args.size, max_upload_bytes=int(args.max_upload_mb * 2**20))
    cfg = ServeConfig(root=args.root, arch=args.arch or "vits14", weights=args.weights, host=args.host,
                      port=args.port, explorer=explorer)
    try:
        serve(cfg, model)
    except OSError as err:  # taken between the check and the bind
        if err.errno not in _LISTEN_ERRNOS:
            raise
        raise ValueError(_listen_error(err, args.host, args.port)) from None
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``viz`` (with ``pca``, ``match``, ``attention``) and ``serve``."""
    viz = subparsers.add_parser("viz", help="PCA maps, patch matches and attention maps as PNG files")
    viz_sub = viz.add_subparsers(dest="viz_command", metavar="WHAT", required=True)

    pca = viz_sub.add_parser("pca", help="PCA of patch features, 3 components as RGB (paper Fig. 1/9)")
    pca.add_argument("images", nargs="+", metavar="IMAGE")
    _add_model_args(pca, PCAConfig().size)
    _add_foreground_args(pca)
    pca.add_argument("--scope", choices=SCOPES, default=PCAConfig().scope,
                     help="first PCA (foreground) per image or joint over all images [image]")
    pca.add_argument("--out", default="pca.png", help="output PNG [pca.png]")
    pca.set_defaults(func=run_pca)

    match = viz_sub.add_parser("match", help="patch matches between two images (paper Fig. 10)")
    match.add_argument("image_a", metavar="IMG_A")
    match.add_argument("image_b", metavar="IMG_B")
    _add_model_args(match, MatchConfig().size)
    _add_foreground_args(match)
    match.add_argument("--max-matches", type=int, default=MatchConfig().max_matches, help="lines drawn at most")
    match.add_argument("--nms-radius", type=int, default=MatchConfig().nms_radius,
                       help="suppression radius in patches (0: none)")
    match.add_argument("--out", default="matches.png", help="output PNG [matches.png]")
    match.set_defaults(func=run_match)

    att = viz_sub.add_parser("attention", help="class-token attention of the last block, per head")
    att.add_argument("image", metavar="IMAGE")
    _add_model_args(att, AttentionConfig().size)
    att.add_argument("--show-registers", action="store_true", help="write the attention to register tokens")
    att.add_argument("--out", default="attention.png", help="output PNG [attention.png]")
    att.set_defaults(func=run_attention)

    srv = subparsers.add_parser("serve", help="local web page to explore features of a folder of images")
    srv.add_argument("--root", default=".", help="folder of images to offer [.]")
    _add_model_args(srv, ExplorerConfig().size)
    srv.add_argument("--host", default=ServeConfig().host, help="address to bind [127.0.0.1]")
    srv.add_argument("--port", type=int, default=ServeConfig().port, help="port (0: any free port) [8000]")
    srv.add_argument("--max-upload-mb", type=float, default=ExplorerConfig().max_upload_bytes / 2**20,
                     help="largest accepted upload in MiB [16]")
    srv.set_defaults(func=run_serve)
