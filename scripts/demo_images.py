"""Write the demo's example images: Fashion-MNIST validation items, a two-item composite, two bundled photos
(`cdam_pl.data.photos`), and a small 'trouser' concept folder (all offline)."""
import sys
from pathlib import Path

from PIL import Image

from cdam_pl.data import FashionMNISTDataset
from cdam_pl.data.photos import load_photo


def main(out: str) -> None:
    out_dir = Path(out)
    concept_dir = out_dir.parent / "concept_trouser"
    concept_dir.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    val = FashionMNISTDataset(split="test")
    seen: dict[int, int] = {}
    for i, y in enumerate(val.targets):  # the first item of each of 6 classes
        if y not in seen and len(seen) < 6:
            seen[y] = i
    for y, i in seen.items():
        val.load_image(i).save(out_dir / f"fmnist_{i}_{val.classes[y].replace('/', '-')}.png")
    first, second = list(seen.values())[:2]  # two items of different classes
    a, b = val.load_image(first), val.load_image(second)
    canvas = Image.new("RGB", (56, 28))
    canvas.paste(a, (0, 0))
    canvas.paste(b, (28, 0))
    canvas.save(out_dir / "composite_two_items.png")
    trousers = [i for i, y in enumerate(val.targets) if y == 1][10:15]
    for i in trousers:
        val.load_image(i).save(concept_dir / f"trouser_{i}.png")
    for name in ("chelsea", "coffee"):
        load_photo(name).save(out_dir / f"photo_{name}.png")
    print(f"demo images in {out_dir}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "demo_out/images")
