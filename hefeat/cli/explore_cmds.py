"""Exploration commands: neighbors, umap, heatmap, tiles, explore."""

from __future__ import annotations

import click

from hefeat.cli.common import (
    emit,
    get_store,
    json_option,
    main,
    store_option,
)
from hefeat.errors import HefeatError


# ---------------------------------------------------------------------------------------------
@main.group()
def neighbors():
    """Cohort-wide nearest-neighbour search over embeddings (faiss)."""


@neighbors.command("build")
@click.option("--extraction", "extraction_id", required=True)
@click.option("--index", "index_type", type=click.Choice(["auto", "flat", "ivf", "hnsw", "ivfpq"]), default="auto", show_default=True)
@click.option("--metric", type=click.Choice(["cosine", "l2"]), default="cosine", show_default=True)
@click.option("--sample", default=100_000, show_default=True, help="Vectors used to train IVF/PQ indexes.")
@click.option("--seed", default=0, show_default=True)
@click.option("--force", is_flag=True)
@store_option
@json_option
def neighbors_build(extraction_id, index_type, metric, sample, seed, force, store_path, as_json):
    """Build a neighbour index (slide by slide) and measure its recall@10 against exact search.

    \b
    Example:
      hefeat neighbors build --extraction e1234 --index hnsw
    """
    from hefeat.explore.neighbors import build_index

    s = build_index(get_store(store_path), extraction_id, index=index_type, metric=metric, sample=sample, seed=seed, force=force)
    emit(s, as_json, f"Index {s['index_id']} ({s['type']}, {s['metric']}): {s['n_vectors']} vectors, "
         f"recall@10 = {s['recall_at_10']:.3f} vs exact search{' (already built)' if s.get('cached') else ''}.")


@neighbors.command("query")
@click.option("--extraction", "extraction_id", default=None)
@click.option("--index", "index_id", default=None, help="Index id (default: the extraction's latest).")
@click.option("--tile", default=None, help="SLIDE:TILE_ID")
@click.option("--image", type=click.Path(dir_okay=False), default=None, help="An image file; embedded first.")
@click.option("--slide", default=None, help="Query by a slide's mean embedding.")
@click.option("-k", "k", default=20, show_default=True)
@click.option("--exclude-same-slide", is_flag=True, help="Leave out tiles of the query's slide.")
@click.option("--exclude-same-patient", is_flag=True, help="Leave out tiles of the query's patient.")
@click.option("--include-self", is_flag=True, help="Keep the query tile itself among the results.")
@click.option("--save", is_flag=True, help="Write the result to the store (the neighbors view).")
@click.option("--physical-check", is_flag=True, help="ST-Net's latent-vs-physical neighbour check instead.")
@store_option
@json_option
def neighbors_query(extraction_id, index_id, tile, image, slide, k, exclude_same_slide, exclude_same_patient,
                    include_self, save, physical_check, store_path, as_json):
    """Nearest tiles to a tile, an image or a slide, joined with slide/patient metadata.

    \b
    Example:
      hefeat neighbors query --extraction e1234 --tile S01:12 -k 20 --exclude-same-slide
    """
    from hefeat.explore.neighbors import latent_vs_physical, query

    st = get_store(store_path)
    if physical_check:
        if not extraction_id:
            raise HefeatError("--physical-check needs --extraction")
        s = latent_vs_physical(st, extraction_id, index_id=index_id)
        emit(s, as_json, f"Nearest latent neighbour is a physically adjacent tile for {s['adjacent_share']:.1%} of "
             f"{s['n_queries']} tiles (same slide: {s['same_slide_share']:.1%}).")
        return
    t = None
    if tile:
        sid, _, tid = tile.rpartition(":")
        if not sid or not tid.isdigit():
            raise HefeatError(f"--tile expects SLIDE:TILE_ID, got {tile!r}")
        t = (sid, int(tid))
    res = query(st, extraction_id=extraction_id, index_id=index_id, tile=t, image=image, slide=slide, k=k,
                exclude_same_slide=exclude_same_slide, exclude_same_patient=exclude_same_patient,
                include_self=include_self, write=save)
    if as_json:
        click.echo(res.to_json(orient="records"))
    else:
        click.echo(res.to_string(index=False))


VALUE_HELP = ("A tiles/slides/clinical column (sharpness, slides.site, clinical.grade), model:<model_id>:<column>, "
              "or SQL returning slide_id, tile_id and one value column (and tiling_id when the store has several tilings).")


@main.command()
@click.option("--extraction", "extraction_id", required=True)
@click.option("--sample", default=100_000, show_default=True, help="Tiles sampled (seeded) for the map.")
@click.option("--pca", default=50, show_default=True, help="PCA components first (0 = none).")
@click.option("--clusters", default=8, show_default=True, help="k-means clusters stored with the map (colour: umap:<id>:cluster).")
@click.option("--seed", default=0, show_default=True)
@click.option("--color", default=None, help="Colour the PNG by: " + VALUE_HELP)
@click.option("--thumbnails", default=0, show_default=True, help="Tile images of N representative points, linked to them.")
@click.option("--purity-label", default=None, help="Labels for k-means purity (same forms as --color).")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="PNG scatter.")
@click.option("--force", is_flag=True, help="Recompute even if this UMAP is stored.")
@store_option
@json_option
def umap(extraction_id, sample, pca, clusters, seed, color, thumbnails, purity_label, out, force, store_path, as_json):
    """UMAP of an extraction (coordinates stored: the umap view), PNG coloured by any value.

    The UMAP id includes the fingerprint of the extraction's data: new or re-extracted slides give a
    new UMAP; an unchanged store finds the stored one ("cached").

    \b
    Examples:
      hefeat umap --extraction e1234 --color sharpness --out umap.png
      hefeat umap --extraction e1234 --color slides.site --thumbnails 8 --out umap.png
      hefeat umap --extraction e1234 --color "SELECT slide_id, tile_id, tissue_frac AS color FROM tiles WHERE tiling_id = 't123'" --out u.png
    """
    from hefeat.explore.umap_map import plot_umap, run_umap, umap_purity

    st = get_store(store_path)
    s = run_umap(st, extraction_id, sample=sample, pca=pca or None, seed=seed, clusters=clusters, force=force)
    if out:
        s.update(plot_umap(st, s["umap_id"], out, color=color, thumbnails=thumbnails))
    if purity_label:
        s["purity"] = umap_purity(st, s["umap_id"], purity_label)
    text = (f"UMAP {s['umap_id']}: {s['n']} tiles of {s.get('n_slides', '?')} slides"
            + (" (cached: stored on " + str(s.get("created", "?")) + " from the same data)" if s.get("cached") else "")
            + (f", plot {out}" if out else ""))
    if "purity" in s:
        text += f", 2-means purity {s['purity']:.3f}"
    emit(s, as_json, text)


@main.command()
@click.option("--slide", required=True)
@click.option("--value", required=True, help=VALUE_HELP)
@click.option("--extraction", "extraction_id", default=None, help="Draw on this extraction's tiling.")
@click.option("--tiling", "tiling_id", default=None, help="Draw on this tiling (default: the query's or the slide's only one).")
@click.option("--out", required=True, type=click.Path(dir_okay=False))
@click.option("--mpp", default=4.0, show_default=True, help="Thumbnail resolution (µm/px).")
@store_option
@json_option
def heatmap(slide, value, extraction_id, tiling_id, out, mpp, store_path, as_json):
    """Any tile-level value over the slide's H&E, at the tiles' true positions, on one tiling.

    \b
    Examples:
      hefeat heatmap --slide S01 --value sharpness --extraction e1234 --out map.png
      hefeat heatmap --slide S01 --value model:gen-1a2b3c:GENE0001 --out map.png
      hefeat heatmap --slide S01 --value "SELECT tile_id, sharpness FROM tiles WHERE slide_id = 'S01' AND tiling_id = 't123'" --out map.png
    """
    from hefeat.explore.heatmap import render_heatmap

    s = render_heatmap(get_store(store_path), slide, value, out, tiling_id=tiling_id, extraction_id=extraction_id, mpp=mpp)
    s.pop("overlay")
    emit(s, as_json, f"Heatmap of {s['label']} over {s['with_value']} of {s['tiles']} tiles of {slide} "
         f"(tiling {s['tiling_id']}): {out}")


@main.group()
def tiles():
    """Look at tiles."""


@tiles.command("show")
@click.option("--tile", required=True, help="SLIDE:TILE_ID")
@click.option("--extraction", "extraction_id", default=None, help="The tile ids of this extraction's tiling.")
@click.option("--tiling", "tiling_id", default=None, help="The tile ids of this tiling (default: the slide's only one).")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="PNG (default: SLIDE_TILE.png)")
@store_option
@json_option
def tiles_show(tile, extraction_id, tiling_id, out, store_path, as_json):
    """Write the pixels of a tile, read from its slide at the tiling's resolution.

    \b
    Example:
      hefeat tiles show --tile S01:12 --extraction e1234 --out tile.png
    """
    from PIL import Image

    from hefeat.explore.tiles import tile_image

    sid, _, tid = tile.rpartition(":")
    if not sid or not tid.isdigit():
        raise HefeatError(f"--tile expects SLIDE:TILE_ID, got {tile!r}")
    img = tile_image(get_store(store_path), sid, int(tid), tiling_id=tiling_id, extraction_id=extraction_id)
    out = out or f"{sid}_{tid}.png"
    Image.fromarray(img).save(out)
    emit({"out": out, "shape": list(img.shape)}, as_json, f"Tile {tile} ({img.shape[1]}x{img.shape[0]} px) -> {out}")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind (default: this machine only).")
@click.option("--port", default=8765, show_default=True)
@click.option("--allow-host", multiple=True, help="Extra Host header names to accept (e.g. a tunnel's name).")
@click.option("--threads", default=4, show_default=True)
@store_option
def explore(host, port, allow_host, threads, store_path):
    """A local, read-only web page over the store: slide viewer with overlays, latent-space map, neighbours.

    Served by waitress on 127.0.0.1; requests naming another Host are refused. Computing a UMAP or an
    index is an explicit button (POST) or `hefeat umap` / `hefeat neighbors build`.

    \b
    Example:
      hefeat umap --extraction e1234 && hefeat neighbors build --extraction e1234
      hefeat explore --port 8765     # then open http://127.0.0.1:8765
    """
    from hefeat.explore.server import serve

    click.echo(f"hefeat explorer on http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port} (Ctrl-C to stop)")
    serve(get_store(store_path), host=host, port=port, threads=threads, allow_hosts=tuple(allow_host))


