"""Held-out code prompts for the speculative-decoding benchmarks: beginnings of Python files.

Written for these benchmarks (not taken from the Python standard library, on which the shipped
default model in models/default was trained): application code of the kinds a code model is
asked to complete (a CLI, a dataclass config, tests, a small web handler, a cache, a parser).
Each ends where a completion would start. `code_prompt_ids` gives them as token ids of the
default model's tokenizer, so every engine compared gets identical inputs.
"""

from __future__ import annotations

CODE_PROMPTS: tuple[str, ...] = (
    '''"""Command-line tool that resizes every image in a folder."""

import argparse
import pathlib
import sys


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Resize images in a folder.")
    parser.add_argument("source", type=pathlib.Path)
    parser.add_argument("destination", type=pathlib.Path)
    parser.add_argument("--width", type=int, default=800)
    parser.add_argument("--height", type=int, default=600)
''',
    '''from dataclasses import dataclass, field


@dataclass
class TrainingConfig:
    learning_rate: float = 3e-4
    batch_size: int = 32
    num_epochs: int = 10
    warmup_steps: int = 500
    weight_decay: float = 0.01
    tags: list = field(default_factory=list)

    def validate(self):
        if self.learning_rate <= 0:
            raise ValueError("learning_rate must be positive")
''',
    '''import unittest

from inventory import Inventory, OutOfStock


class InventoryTest(unittest.TestCase):
    def setUp(self):
        self.inventory = Inventory()
        self.inventory.add("apple", 10)
        self.inventory.add("pear", 3)

    def test_add_increases_count(self):
        self.inventory.add("apple", 5)
        self.assertEqual(self.inventory.count("apple"), 15)

    def test_remove_decreases_count(self):
''',
    '''class LRUCache:
    """A fixed-size cache that evicts the least recently used key."""

    def __init__(self, capacity):
        self.capacity = capacity
        self.items = {}
        self.order = []

    def get(self, key):
        if key not in self.items:
            return None
        self.order.remove(key)
        self.order.append(key)
        return self.items[key]

    def put(self, key, value):
''',
    '''import json
import logging

logger = logging.getLogger(__name__)


def load_users(path):
    with open(path) as f:
        data = json.load(f)
    users = []
    for entry in data["users"]:
        if "email" not in entry:
            logger.warning("skipping user without email: %r", entry)
            continue
        users.append(User(name=entry["name"], email=entry["email"]))
    return users


def save_users(path, users):
''',
    '''import sqlite3


class TodoRepository:
    def __init__(self, db_path):
        self.conn = sqlite3.connect(db_path)
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS todos (id INTEGER PRIMARY KEY, title TEXT, done INTEGER)"
        )

    def add(self, title):
        cur = self.conn.execute("INSERT INTO todos (title, done) VALUES (?, 0)", (title,))
        self.conn.commit()
        return cur.lastrowid

    def mark_done(self, todo_id):
''',
    '''import asyncio


async def worker(name, queue, results):
    while True:
        url = await queue.get()
        try:
            body = await fetch(url)
            results[url] = len(body)
        except Exception as exc:
            results[url] = exc
        finally:
            queue.task_done()


async def main(urls, num_workers=4):
''',
    '''class Vector:
    def __init__(self, x, y):
        self.x = x
        self.y = y

    def __add__(self, other):
        return Vector(self.x + other.x, self.y + other.y)

    def __sub__(self, other):
        return Vector(self.x - other.x, self.y - other.y)

    def __mul__(self, scalar):
        return Vector(self.x * scalar, self.y * scalar)

    def dot(self, other):
''',
    '''def tokenize(expression):
    """Split an arithmetic expression into numbers, operators and parentheses."""
    tokens = []
    i = 0
    while i < len(expression):
        char = expression[i]
        if char.isspace():
            i += 1
        elif char.isdigit():
            start = i
            while i < len(expression) and expression[i].isdigit():
                i += 1
            tokens.append(("NUM", int(expression[start:i])))
        elif char in "+-*/":
''',
    '''from enum import Enum


class State(Enum):
    IDLE = "idle"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


TRANSITIONS = {
    State.IDLE: {State.RUNNING},
    State.RUNNING: {State.PAUSED, State.STOPPED},
    State.PAUSED: {State.RUNNING, State.STOPPED},
}


class Machine:
    def __init__(self):
        self.state = State.IDLE

    def transition(self, new_state):
''',
    '''import csv
from collections import defaultdict


def total_sales_by_region(path):
    totals = defaultdict(float)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            region = row["region"].strip().lower()
            totals[region] += float(row["amount"])
    return dict(totals)


def top_regions(totals, n=3):
''',
    '''class Node:
    def __init__(self, value):
        self.value = value
        self.left = None
        self.right = None


class BinarySearchTree:
    def __init__(self):
        self.root = None

    def insert(self, value):
        if self.root is None:
            self.root = Node(value)
            return
        node = self.root
        while True:
''',
    '''import time
import functools


def retry(times=3, delay=0.5, exceptions=(Exception,)):
    """Retry the decorated function when it raises one of `exceptions`."""

    def decorator(func):
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            for attempt in range(1, times + 1):
                try:
                    return func(*args, **kwargs)
''',
    '''def neighbours(grid, row, col):
    count = 0
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            if dr == 0 and dc == 0:
                continue
            r, c = row + dr, col + dc
            if 0 <= r < len(grid) and 0 <= c < len(grid[0]):
                count += grid[r][c]
    return count


def step(grid):
''',
    '''from http.server import BaseHTTPRequestHandler, HTTPServer
import json

NOTES = []


class NotesHandler(BaseHTTPRequestHandler):
    def _send_json(self, status, payload):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
''',
    '''class Matrix:
    def __init__(self, rows):
        self.rows = [list(row) for row in rows]
        self.n_rows = len(self.rows)
        self.n_cols = len(self.rows[0]) if self.rows else 0

    @classmethod
    def zeros(cls, n_rows, n_cols):
        return cls([[0] * n_cols for _ in range(n_rows)])

    def transpose(self):
        return Matrix([[self.rows[r][c] for r in range(self.n_rows)] for c in range(self.n_cols)])

    def __matmul__(self, other):
''',
)


def code_prompt_ids(model_dir: str | None = None, count: int | None = None) -> list[list[int]]:
    """`count` prompts (default: all 16) as token ids of `model_dir`'s tokenizer (default: the
    shipped default model's), BOS included. Past 16 the prompts repeat, each repetition with a
    comment line of its own in front, so no two prompts of a batch are identical."""
    from tokenizers import Tokenizer

    if model_dir is None:
        from engine_core.models import default_model_dir
        model_dir = default_model_dir()
    tokenizer = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
    count = len(CODE_PROMPTS) if count is None else count
    texts = []
    for i in range(count):
        text = CODE_PROMPTS[i % len(CODE_PROMPTS)]
        if i >= len(CODE_PROMPTS):
            text = f"# copy {i // len(CODE_PROMPTS)}\n{text}"
        texts.append(text)
    return [encoding.ids for encoding in tokenizer.encode_batch(texts)]
