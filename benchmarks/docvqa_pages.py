"""DocVQA-shaped samples for the benchmarks (bench_train.py, bench_data.py): synthetic document pages of real DocVQA
sizes, a question and a short answer each. Only PIL is needed, so that importing this is quick."""

import random

QUESTIONS = [
    ("What is the date mentioned in this letter?", "March 14, 1998"),
    ("Who is the sender of the memo?", "R. J. Reynolds"),
    ("What is the total amount?", "$1,245.00"),
    ("What is the title of the document?", "Annual Report"),
    ("To whom is the letter addressed?", "Dr. Jane Smith"),
    ("What is the page number?", "7"),
]
# (width, height): a smaller page (13 of the 17 crop slots used), then letter scans (all 17 used).
PAGE_SIZES = [(1000, 1400)] + [(1700, 2200)] * 5


def document_page(rng: random.Random, size):
    """A white page with a header, lines of text and a table: a scanned document's structure at its size."""
    from PIL import Image, ImageDraw

    width, height = size
    page = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(page)
    margin, line_height = width // 12, max(14, height // 80)
    draw.rectangle((margin, margin, width - margin, margin + 3 * line_height), fill=(30, 30, 30))
    y = margin + 5 * line_height
    words = ["invoice", "total", "report", "tobacco", "research", "committee", "budget", "1998", "page", "date"]
    while y < height - margin - 10 * line_height:
        x = margin
        while x < width - margin - 80:
            word = rng.choice(words)
            draw.text((x, y), word, fill=(20, 20, 20))
            x += 8 * len(word) + rng.randint(8, 20)
        y += line_height
    for row in range(6):  # a table at the bottom
        top = height - margin - (6 - row) * line_height
        draw.rectangle((margin, top, width - margin, top + line_height), outline=(0, 0, 0), width=2)
    return page


def docvqa_records(n: int, seed: int = 0) -> list[dict]:
    """Records (phi3v.records format, images in memory) of one page, a question and its short answer each."""
    rng = random.Random(seed)
    records = []
    for index in range(n):
        question, answer = QUESTIONS[index % len(QUESTIONS)]
        records.append({
            "id": f"bench-docvqa-{index}",
            "source": f"bench_train[{index}]",
            "images": [document_page(rng, PAGE_SIZES[index % len(PAGE_SIZES)])],
            "messages": [{"role": "user", "content": f"<|image_1|>\n{question}"},
                         {"role": "assistant", "content": answer}],
        })
    return records
