"""Boilerplate alt-text: the strings a crawler finds where a caption should be, which describe nothing in the image.

Web alt attributes are often a camera file name, a camera model, shop or price text, a copyright line, a share
button, a site name, a date, an image size or a stock-photo id. `alt_texts` draws such strings for the
`alt-text` noise kind (pipeline/noise_kinds.py).

Each string joins a random number of fragments, each from an independent slot with its own vocabulary and
random numbers, with a random separator and casing. No template is meant to be matched by a detector: a hidden
evaluation uses other templates and proportions, so what must carry over is the property (text about the file,
the page or the shop, never about what is shown), not the strings.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np

logger = logging.getLogger(__name__)

Rng = np.random.Generator

_EXTENSIONS = ("jpg", "JPG", "jpeg", "png", "PNG", "webp", "gif", "heic", "tif", "CR2", "NEF", "JPEG")
_FILE_WORDS = ("banner", "header", "thumb", "hero", "slide", "featured", "cropped", "final", "edit", "copy",
               "small", "large", "web", "hd", "img", "image", "photo", "pic", "upload", "asset", "default", "new")
_BRANDS = {
    "Canon": ("EOS 5D Mark III", "EOS R6", "EOS 80D", "PowerShot G7 X", "EOS Rebel T6i", "EOS 1100D"),
    "NIKON": ("D750", "D3200", "Z 6II", "D850", "COOLPIX P900", "D5100"),
    "Sony": ("ILCE-7M3", "DSC-RX100M5", "A6400", "ILCE-6000", "Cyber-shot DSC-W800"),
    "FUJIFILM": ("X-T3", "X100V", "X-E4", "FinePix S1"),
    "OLYMPUS": ("E-M10 Mark II", "PEN E-PL9", "TG-6"),
    "Apple": ("iPhone 6s", "iPhone X", "iPhone 12 Pro", "iPhone 14 Pro Max", "iPhone SE"),
    "samsung": ("SM-G991B", "SM-A526B", "Galaxy S10", "SM-N975F"),
    "Google": ("Pixel 4a", "Pixel 6", "Pixel 7 Pro"),
    "Panasonic": ("DMC-GH4", "DC-G9", "DMC-FZ1000"),
    "GoPro": ("HERO9 Black", "HERO5"),
    "DJI": ("FC7303", "Mavic Air 2", "Osmo Pocket"),
}
_SHOP = ("Buy now", "Add to cart", "Add to basket", "In stock", "Out of stock", "Free shipping", "Shop now",
         "Checkout", "Best seller", "New arrival", "Limited offer", "Quick view", "Wishlist", "Compare",
         "Order today", "Sold out", "Pre-order", "Gift card", "Clearance", "Members only", "Back in stock")
_CURRENCIES = ("$", "€", "£", "USD ", "EUR ", "CHF ", "¥")
_FIRST = ("John", "Maria", "Wei", "Anna", "David", "Laura", "Kenji", "Sofia", "Ahmed", "Olga", "Pierre",
          "Emma", "Lucas", "Chloe", "Raj", "Ines", "Tom", "Nadia", "Mark", "Yuki")
_LAST = ("Smith", "Garcia", "Chen", "Kowalski", "Müller", "Rossi", "Tanaka", "Dubois", "Silva", "Novak",
         "Johnson", "Okafor", "Larsen", "Petrov", "Nguyen", "Brown", "Haddad", "Berg", "Moreau", "Ito")
_AGENCIES = ("Getty Images", "Shutterstock", "Alamy", "iStock", "Adobe Stock", "Dreamstime", "123RF", "AP",
             "Reuters", "AFP", "Depositphotos", "Pexels", "Unsplash", "Flickr")
_LICENCES = ("CC BY 2.0", "CC BY-SA 4.0", "CC BY-NC-ND 3.0", "CC0", "Public domain", "All rights reserved",
             "Some rights reserved", "Used with permission", "Editorial use only", "Do not reproduce",
             "Licensed under Creative Commons", "Royalty free")
_UI = ("Click to enlarge", "Click here", "View larger image", "View full size", "Share", "Share on Facebook",
       "Share on Twitter", "Pin it", "Tweet", "Like", "Like us on Facebook", "Follow us", "Subscribe",
       "Read more", "Continue reading", "Download", "Zoom", "Next", "Previous", "Back to top", "thumbnail",
       "image", "img", "logo", "icon", "banner", "placeholder", "loading...", "spacer", "avatar",
       "Open in new window", "Home", "Menu", "Gallery", "Embedded image", "No image available",
       "Image not found", "Permalink", "Print", "Email this", "Save", "Swipe for more", "Play video")
_SYLLABLES = ("ka", "lo", "mi", "zen", "tor", "pa", "vi", "ex", "ru", "no", "sta", "bel", "qu", "ix", "do",
              "mar", "fle", "gri", "on", "tek", "lu", "sho", "ver", "ay", "pix", "net", "hub", "go", "li", "ro")
_TLDS = ("com", "net", "org", "co.uk", "de", "fr", "io", "info", "biz", "ru", "com.au", "nl", "it", "jp")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_SEPARATORS = (" ", " - ", " | ", ", ", " :: ", " / ", " · ", "_", "; ", " – ", "  ")


def _pick(rng: Rng, items: Sequence[str]) -> str:
    return items[int(rng.integers(len(items)))]


def _digits(rng: Rng, width: int) -> str:
    return "".join(str(d) for d in rng.integers(0, 10, size=width))


def _alnum(rng: Rng, width: int) -> str:
    alphabet = "ABCDEFGHJKLMNPQRSTUVWXYZ0123456789"
    return "".join(alphabet[i] for i in rng.integers(0, len(alphabet), size=width))


def _ymd(rng: Rng) -> tuple[int, int, int]:
    return int(rng.integers(1998, 2025)), int(rng.integers(1, 13)), int(rng.integers(1, 29))


def _word(rng: Rng) -> str:
    """A pronounceable made-up name (site, shop, handle): open-ended, unlike any fixed list."""
    return "".join(_pick(rng, _SYLLABLES) for _ in range(int(rng.integers(2, 4))))


def _person(rng: Rng) -> str:
    first = _pick(rng, _FIRST) if rng.random() < 0.7 else _word(rng).title()
    return f"{first} {_pick(rng, _LAST) if rng.random() < 0.7 else _word(rng).title()}"


# ------------------------------------------------------------------------------------------------- slots


def file_name(rng: Rng) -> str:
    y, m, d = _ymd(rng)
    stem = _pick(rng, (
        f"IMG_{_digits(rng, 4)}", f"DSC_{_digits(rng, 4)}", f"DSC{_digits(rng, 5)}", f"DSCN{_digits(rng, 4)}",
        f"_MG_{_digits(rng, 4)}", f"P{_digits(rng, 7)}", f"PXL_{y}{m:02d}{d:02d}_{_digits(rng, 9)}",
        f"IMG_{y}{m:02d}{d:02d}_{_digits(rng, 6)}", f"IMG-{y}{m:02d}{d:02d}-WA{_digits(rng, 4)}",
        f"{y}{m:02d}{d:02d}_{_digits(rng, 6)}", f"photo-{_digits(rng, int(rng.integers(2, 7)))}",
        f"image{_digits(rng, int(rng.integers(1, 4)))}",
        f"Screenshot {y}-{m:02d}-{d:02d} at 1{_digits(rng, 1)}.2{_digits(rng, 1)}", f"GOPR{_digits(rng, 4)}",
        f"DJI_{_digits(rng, 4)}", f"scan{_digits(rng, 3)}", f"untitled-{_digits(rng, 2)}",
        "".join(_pick(rng, "0123456789abcdef") for _ in range(int(rng.integers(8, 33)))),
        f"{_pick(rng, _FILE_WORDS)}-{_pick(rng, _FILE_WORDS)}-{_digits(rng, 2)}",
    ))
    suffix = _pick(rng, ("", "", "", f"-{_digits(rng, 3)}x{_digits(rng, 3)}", "-scaled", " (1)", " copy", "_o"))
    return f"{stem}{suffix}.{_pick(rng, _EXTENSIONS)}"


def camera(rng: Rng) -> str:
    brand = _pick(rng, tuple(_BRANDS))
    text = f"{brand} {_pick(rng, _BRANDS[brand])}" if rng.random() < 0.8 else _pick(rng, _BRANDS[brand])
    if rng.random() < 0.4:
        iso, fnum = int(rng.choice([100, 200, 400, 800, 1600, 3200])), float(rng.choice([1.8, 2.8, 4, 5.6, 8, 11]))
        text += _pick(rng, (f" 1/{int(rng.choice([30, 60, 125, 250, 500, 1000]))}s f/{fnum:g} ISO {iso}",
                            f", {int(rng.integers(10, 300))}mm, f/{fnum:g}, ISO{iso}"))
    return text


def shop(rng: Rng) -> str:
    price = f"{_pick(rng, _CURRENCIES)}{int(rng.integers(1, 500))}.{_pick(rng, ('99', '95', '00', '49'))}"
    return _pick(rng, (
        _pick(rng, _SHOP), price, f"Price: {price}", f"Now {price}", f"Sale {int(rng.integers(1, 8)) * 10}% off",
        f"Free shipping on orders over {_pick(rng, _CURRENCIES)}{int(rng.integers(2, 20)) * 5}",
        f"SKU {_alnum(rng, int(rng.integers(5, 10)))}", f"Item #{_digits(rng, 6)}",
        f"Only {int(rng.integers(1, 9))} left", f"Ships in {int(rng.integers(1, 15))} days",
        f"{int(rng.integers(2, 900))} reviews", f"{_word(rng).title()} Store",
        f"www.{_word(rng)}shop.{_pick(rng, _TLDS)}", "★" * int(rng.integers(1, 6)) + "☆" * int(rng.integers(0, 3)),
    ))


def copyright_line(rng: Rng) -> str:
    year, person = _ymd(rng)[0], _person(rng)
    return _pick(rng, (
        f"© {year} {person}", f"Copyright {year} {person}. All rights reserved.", f"(c) {person} {year}",
        f"Photo by {person}", f"Photo: {person}/{_pick(rng, _AGENCIES)}", f"Credit: {_pick(rng, _AGENCIES)}",
        f"Image courtesy of {person}", f"{person} Photography", _pick(rng, _LICENCES),
        f"{person} via {_pick(rng, _AGENCIES)}, {_pick(rng, _LICENCES)}", f"Copyright © {_word(rng).title()} Media",
    ))


def ui_string(rng: Rng) -> str:
    count, total = int(rng.integers(1, 20)), int(rng.integers(20, 60))
    return _pick(rng, (_pick(rng, _UI), _pick(rng, _UI), f"Slide {count} of {total}", f"Image {count} of {total}",
                       f"Comments ({count})", f"{count}{_pick(rng, ('k', '', '.2k'))} likes", f"{count} shares"))


def site(rng: Rng) -> str:
    name, tld = _word(rng), _pick(rng, _TLDS)
    return _pick(rng, (
        f"www.{name}.{tld}", f"{name}.{tld}", f"{name}.blogspot.com", f"{name}.wordpress.com", f"@{name}",
        f"{name.title()} Blog", f"https://{name}.{tld}/wp-content/uploads/{_ymd(rng)[0]}/{_ymd(rng)[1]:02d}/",
        f"{name.title()}.{tld}", f"http://{name}.{tld}/images/{_digits(rng, 4)}", f"{name.upper()} | {tld.upper()}",
    ))


def date(rng: Rng) -> str:
    y, m, d = _ymd(rng)
    hh, mm, ss = int(rng.integers(0, 24)), int(rng.integers(0, 60)), int(rng.integers(0, 60))
    return _pick(rng, (
        f"{y}-{m:02d}-{d:02d}", f"{d:02d}/{m:02d}/{y}", f"{m}/{d}/{y % 100:02d}", f"{_MONTHS[m - 1]} {d}, {y}",
        f"{d} {_MONTHS[m - 1][:3]} {y}", f"{y}{m:02d}{d:02d}", f"{y}:{m:02d}:{d:02d} {hh:02d}:{mm:02d}:{ss:02d}",
        f"Posted on {_pick(rng, _WEEKDAYS)}, {d} {_MONTHS[m - 1]} {y}", f"{d}.{m}.{y}", f"Updated {_MONTHS[m - 1]} {y}",
    ))


def image_size(rng: Rng) -> str:
    w = int(rng.choice([150, 300, 320, 480, 600, 640, 800, 1024, 1200, 1280, 1920, 2048, 3000, 4000, 6000]))
    h = int(w * float(rng.choice([0.5, 0.5625, 0.6667, 0.75, 1.0, 1.333])))
    return _pick(rng, (f"{w}x{h}", f"{w} × {h} px", f"{w}x{h} pixels", f"{rng.uniform(0.1, 12):.1f} MB",
                       f"{int(rng.integers(20, 900))} KB", f"{int(rng.choice([72, 96, 150, 300]))} dpi",
                       f"{int(rng.integers(2, 50))} megapixels", f"Size: {_pick(rng, ('S', 'M', 'L', 'XL'))}"))


def stock_id(rng: Rng) -> str:
    return _pick(rng, (
        f"Stock Photo - {_digits(rng, 8)}", f"stock photo ID {_digits(rng, int(rng.integers(6, 11)))}",
        f"Royalty-free stock image #{_digits(rng, 7)}", f"Image ID: {_alnum(rng, 7)}",
        f"{_pick(rng, _AGENCIES)} {_digits(rng, int(rng.integers(6, 11)))}", f"Ref. {_alnum(rng, 6)}",
        f"{_pick(rng, _AGENCIES)} Stock Photo {_alnum(rng, 7)}", f"Editorial {_digits(rng, 9)}",
    ))


SLOTS: dict[str, Callable[[Rng], str]] = {
    "file_name": file_name, "camera": camera, "shop": shop, "copyright": copyright_line, "ui": ui_string,
    "site": site, "date": date, "image_size": image_size, "stock_id": stock_id,
}


# ----------------------------------------------------------------------------------------------- compose


def _case(rng: Rng, text: str) -> str:
    roll = rng.random()
    if roll < 0.08:
        return text.lower()
    if roll < 0.12:
        return text.upper()
    return text


def alt_text(rng: Rng) -> str:
    """One boilerplate string: 1 to 4 fragments of independently chosen slots, one separator, maybe recased."""
    slots = tuple(SLOTS.values())
    count = int(rng.choice([1, 2, 3, 4], p=[0.35, 0.35, 0.2, 0.1]))
    fragments = [slots[int(rng.integers(len(slots)))](rng) for _ in range(count)]
    return _case(rng, _pick(rng, _SEPARATORS).join(fragments))


def alt_texts(count: int, rng: Rng | int) -> list[str]:
    """`count` boilerplate strings; the same seed (or generator state) gives the same strings."""
    rng = np.random.default_rng(rng) if isinstance(rng, (int, np.integer)) else rng
    return [alt_text(rng) for _ in range(count)]
