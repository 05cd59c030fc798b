"""A solution of exercise bpe."""


def train_merges(words, n_merges):
    words = {tuple(w): c for w, c in words.items()}
    token_bytes = {i: bytes([i]) for i in range(256)}
    known = set(token_bytes.values())
    skipped = set()
    merges = []
    while len(merges) < n_merges:
        counts = {}
        for w, c in words.items():
            for pair in zip(w, w[1:]):
                counts[pair] = counts.get(pair, 0) + c
        candidates = [(-n, pair) for pair, n in counts.items() if pair not in skipped]
        if not candidates:
            break
        _, pair = min(candidates)                            # MUTATE: min(candidates) -> max(candidates, key=lambda c: (-c[0], c[1]))
        merged = token_bytes[pair[0]] + token_bytes[pair[1]]
        if merged in known:
            skipped.add(pair)
            continue
        new = 256 + len(merges)
        token_bytes[new] = merged
        known.add(merged)
        merges.append(pair)
        out = {}
        for w, c in words.items():
            nw, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == pair:
                    nw.append(new)
                    i += 2
                else:
                    nw.append(w[i])
                    i += 1
            out[tuple(nw)] = out.get(tuple(nw), 0) + c
        words = out
    return merges
