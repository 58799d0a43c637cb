"""PyTorch references of EViT, ToMe and BAT on timm's VisionTransformer blocks.

BAT has no official code: `bat` restates the reconstruction of spec §4.2,
one image at a time with plain loops, independently of lvtp_jax/pruning/
policies/bat.py. EViT and ToMe are
written here from ../shared/specs/classification_policies.md §2 and §3 and
the behaviour of the official code (youweiliang/evit `evit.py`,
facebookresearch/ToMe `tome/merge.py`, `tome/patch/timm.py`), which these
functions restate in plain PyTorch rather than import or copy: the parity
tests compare lvtp_jax's JAX policies against them, never against lvtp_jax
itself. Ties, which the official code leaves to torch's unspecified sort
order, are broken as lvtp_jax documents (the lower position first).

`forward(model, images, reduce)` runs a timm VisionTransformer (eval mode)
with `reduce(block_index, x, attn, keys, state)` applied between each
block's attention residual and its MLP; `state['size']` holds ToMe's token
sizes and turns on proportional attention when `state['prop_attn']`.
"""

import math

import torch


def _attention(block, x, log_size):
  """timm Attention on x [B, N, C]: (output, softmax map, keys)."""
  attn = block.attn
  b, n, c = x.shape
  h = attn.num_heads
  qkv = attn.qkv(x).reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
  q, k, v = qkv[0], qkv[1], qkv[2]
  logits = (q * attn.scale) @ k.transpose(-2, -1)
  if log_size is not None:
    logits = logits + log_size[:, None, None, :]
  probs = logits.softmax(dim=-1)
  out = (probs @ v).transpose(1, 2).reshape(b, n, c)
  return attn.proj(out), probs, k


@torch.no_grad()
def forward(model, images_nchw, reduce):
  """Logits of a timm ViT/DeiT with an in-block reduction."""
  x = model.patch_embed(images_nchw)
  x = model._pos_embed(x)  # pylint: disable=protected-access
  x = model.norm_pre(x)
  state = dict(size=None, prop_attn=False)
  for i, block in enumerate(model.blocks):
    log_size = None
    if state['prop_attn'] and state['size'] is not None:
      log_size = state['size'].log()
    y, probs, keys = _attention(block, block.norm1(x), log_size)
    x = x + block.ls1(y)
    x = reduce(i, x, probs, keys, state)
    x = x + block.ls2(block.mlp(block.norm2(x)))
  x = model.norm(x)
  if model.global_pool == 'avg' and state['size'] is not None:
    # ToMe's MAE patch: the average pool weighs every token by its size.
    size = state['size'][:, 1:, None]
    pooled = (x[:, 1:] * size).sum(dim=1) / size.sum(dim=1)
    return model.head(model.fc_norm(pooled))
  return model.forward_head(x)


def evit(layers, keep_rate, fuse_token=True):
  """EViT in the blocks `layers` (1-based); §2.1 and evit.py."""
  zero_based = {k - 1 for k in layers}

  def reduce(i, x, probs, keys, state):
    del keys, state
    if i not in zero_based:
      return x
    b, n, c = x.shape
    left = math.ceil(keep_rate * (n - 1))
    if left == n - 1:
      return x
    score = probs[:, :, 0, 1:].mean(dim=1)                     # [B, N-1]
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    kept_idx = order[:, :left]
    others = x[:, 1:]
    kept = others.gather(1, kept_idx[..., None].expand(-1, -1, c))
    parts = [x[:, :1], kept]
    if fuse_token:
      dropped = torch.ones(b, n - 1, dtype=torch.bool)
      dropped.scatter_(1, kept_idx, False)
      weights = torch.where(dropped, score, torch.zeros_like(score))
      parts.append((others * weights[..., None]).sum(dim=1, keepdim=True))
    return torch.cat(parts, dim=1)

  return reduce


def tome_schedule(r, inflect, depth):
  """The official parse_r for (r, inflect): a truncated linear ramp."""
  start = int(r * (1.0 - inflect))
  step = (2 * r - 2 * start) / (depth - 1)
  return [int(start + step * i) for i in range(depth)]


def bipartite_merge(x, size, metric, r, protected):
  """ToMe's matching and size-weighted merge (§3.1): (x, size) of n - r."""
  b, n, c = x.shape
  metric = metric / metric.norm(dim=-1, keepdim=True)
  a, bb = metric[:, ::2], metric[:, 1::2]
  scores = a @ bb.transpose(-1, -2)
  scores[:, 0, :] = -math.inf
  if protected == 2:
    scores[:, :, 0] = -math.inf
  node_max, node_idx = scores.max(dim=-1)
  order = torch.sort(node_max, dim=-1, descending=True, stable=True).indices
  src_idx = order[:, :r]
  unm_idx = order[:, r:].sort(dim=-1).values
  dst_idx = node_idx.gather(1, src_idx)
  weighted = x * size[..., None]
  xa, xb = weighted[:, ::2], weighted[:, 1::2]
  sa, sb = size[:, ::2], size[:, 1::2]
  xb = xb.scatter_add(1, dst_idx[..., None].expand(-1, -1, c),
                      xa.gather(1, src_idx[..., None].expand(-1, -1, c)))
  sb = sb.scatter_add(1, dst_idx, sa.gather(1, src_idx))
  xu = xa.gather(1, unm_idx[..., None].expand(-1, -1, c))
  su = sa.gather(1, unm_idx)
  if protected == 2:
    x = torch.cat([xu[:, :1], xb[:, :1], xu[:, 1:], xb[:, 1:]], dim=1)
    size = torch.cat([su[:, :1], sb[:, :1], su[:, 1:], sb[:, 1:]], dim=1)
  else:
    x = torch.cat([xu, xb], dim=1)
    size = torch.cat([su, sb], dim=1)
  return x / size[..., None], size


def tome(rs, distill_token=False, prop_attn=True):
  """ToMe with rs[i] tokens merged in block i (0-based); §3.1."""
  protected = 2 if distill_token else 1

  def reduce(i, x, probs, keys, state):
    del probs
    state['prop_attn'] = prop_attn
    b, n, _ = x.shape
    r = min(rs[i], (n - protected) // 2)
    if r <= 0:
      return x
    size = state['size'] if state['size'] is not None else torch.ones(b, n)
    x, state['size'] = bipartite_merge(x, size, keys.mean(dim=1), r,
                                       protected)
    return x

  return reduce


def dpc_knn(y, c, k):
  """Spec §4.2 item 2 on y [M, C] (one image): (centres, assign)."""
  m, ch = y.shape
  dist = ((y[:, None, :] - y[None, :, :]) ** 2).sum(-1).sqrt() / math.sqrt(ch)
  nearest = dist.sort(dim=1).values[:, :min(k, m)]
  density = torch.exp(-(nearest ** 2).mean(dim=1))
  separation = torch.empty(m, dtype=y.dtype)
  for i in range(m):
    denser = [j for j in range(m) if density[j] > density[i] or
              (density[j] == density[i] and j < i)]
    separation[i] = (dist[i, denser].min() if denser else dist[i].max())
  score = density * separation
  centres = torch.sort(score, descending=True, stable=True).indices[:c]
  assign = dist[:, centres].argmin(dim=1)
  assign[centres] = torch.arange(c)
  return centres, assign


def bat(layers, keep_rate, cluster_ratio=0.25, knn_k=5,
        cluster_weights='cls_attn', match_metric='keys', prop_attn=False):
  """BAT as reconstructed in §4.2, in the blocks `layers` (1-based)."""
  zero_based = {k - 1 for k in layers}

  def reduce(i, x, probs, keys, state):
    state['prop_attn'] = prop_attn
    if i not in zero_based:
      return x
    b, n_in, ch = x.shape
    n = n_in - 1
    k = math.ceil(keep_rate * n)
    m = n - k
    if m <= 0:
      return x
    c = min(max(math.ceil(cluster_ratio * m), 1), m)
    r = min(c, k // 2)
    size = state['size'] if state['size'] is not None else torch.ones(b, n_in)
    score = probs[:, :, 0, 1:].mean(dim=1)
    out_x, out_s = [], []
    for img in range(b):
      order = torch.sort(score[img], descending=True, stable=True).indices
      att = order[:k]
      inatt = order[k:].sort().values
      sub = torch.cat([torch.zeros(1, dtype=torch.long), att + 1])
      metric = (keys[img][:, sub].mean(dim=0) if match_metric == 'keys'
                else x[img][sub])
      if r:
        xm, sm = bipartite_merge(x[img][sub][None], size[img][sub][None],
                                 metric[None], r, 1)
      else:
        xm, sm = x[img][sub][None], size[img][sub][None]
      y = x[img][inatt + 1]
      centres, assign = dpc_knn(y, c, knn_k)
      w = (score[img][inatt] if cluster_weights == 'cls_attn'
           else torch.ones(m))
      z = torch.stack([(w[assign == j, None] * y[assign == j]).sum(0) /
                       w[assign == j].sum() for j in range(c)])
      zs = torch.stack([size[img][inatt + 1][assign == j].sum()
                        for j in range(c)])
      out_x.append(torch.cat([xm[0], z]))
      out_s.append(torch.cat([sm[0], zs]))
    state['size'] = torch.stack(out_s)
    return torch.stack(out_x)

  return reduce


def _gtp_graph(patches, side, graph_type, num_neighbours):
  """GTP's normalised graph (§5.1) of patches [B, P, C] on a side x side
  grid, with D = diag(row sums): D^-1/2 G D^-1/2, row = receiver."""
  b, p, _ = patches.shape
  graph = torch.zeros(b, p, p, dtype=torch.int32)
  if graph_type in ('Spatial', 'Mixed'):
    spatial = torch.zeros(p, p, dtype=torch.int32)
    for i in range(p):
      for j in range(p):
        far = max(abs(i // side - j // side), abs(i % side - j % side))
        spatial[i, j] = int(far == 1)
    graph = graph | spatial[None]
  if graph_type in ('Semantic', 'Mixed'):
    unit = patches / patches.norm(dim=-1, keepdim=True)
    sim = unit @ unit.transpose(1, 2)
    # Entries >= the (P - k)-th smallest of the row (its (k+1)-th largest,
    # self included), then self taken out by subtraction.
    threshold = sim.kthvalue(p - num_neighbours, dim=-1, keepdim=True).values
    semantic = (sim >= threshold).int() - torch.eye(p, dtype=torch.int32)
    graph = graph | semantic
  graph = graph.to(patches.dtype)
  scale = graph.sum(dim=-1) ** -0.5
  return scale[:, :, None] * graph * scale[:, None, :]


def _gtp_score(probs, selection):
  """Per-patch score of GTP's selection rules (§5.1, §5.2a) [B, N-1]."""
  over_heads = ((lambda t: t.max(dim=1).values) if selection.endswith('Max')
                else (lambda t: t.mean(dim=1)))
  diag = probs.diagonal(dim1=-2, dim2=-1)[:, :, 1:]
  cols = probs[:, :, :, 1:].sum(dim=2)
  if selection in ('CLSAttnMean', 'CLSAttnMax'):
    return over_heads(probs[:, :, 0, 1:])
  if selection in ('IMGAttnMean', 'IMGAttnMax'):
    return over_heads(cols)
  if selection in ('DiagAttnMean', 'DiagAttnMax'):
    return over_heads(diag)
  if selection in ('MixedAttnMean', 'MixedAttnMax'):
    return over_heads(diag) * over_heads(cols)
  if selection == 'SumAttnMax':
    return over_heads(diag) + over_heads(cols)
  if selection in ('CosSimMean', 'CosSimMax'):
    rows = over_heads(probs[:, :, 1:, :])
    rows = rows / rows.norm(dim=-1, keepdim=True)
    return -(rows @ rows.transpose(1, 2)).sum(dim=-1)
  raise ValueError(selection)


@torch.no_grad()
def gtp_forward(model, images_nchw, num_prop, selection='MixedAttnMax',
                alpha=0.1, graph_type='Mixed', num_neighbours=8,
                token_scale=False, sparsity=1.0, margins=None):
  """Logits of a timm ViT/DeiT (CLS token, eval mode) run as GTP-ViT's
  models_v3.py runs it (§5.1, §5.2a), one image at a time in the
  propagation step.

  margins: a list; when given, the relative gap that keeps each of the
  forward's discontinuous decisions as it is (the attention cut: between
  the k-th smallest entry and the one below it; the selection: between
  the last kept and the first propagated score) is appended per block, the
  smallest over images and heads. A float32 forward that strays less than
  that from this one makes the same decisions."""
  x = model.patch_embed(images_nchw)
  x = model._pos_embed(x)  # pylint: disable=protected-access
  x = model.norm_pre(x)
  b, n, c = x.shape
  side = math.isqrt(n - 1)
  graph = (_gtp_graph(x[:, 1:], side, graph_type, num_neighbours)
           if num_prop else None)
  scales = torch.ones(b, n, dtype=x.dtype)
  for block in model.blocks:
    n = x.shape[1]
    attn = block.attn
    h = attn.num_heads
    qkv = attn.qkv(block.norm1(x)).reshape(b, n, 3, h, c // h)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if token_scale:
      logits = logits + scales.log()[:, None, None, :]
    probs = logits.softmax(dim=-1)
    cut = int(n * n * (1 - sparsity))
    if sparsity < 1 and cut >= 1:
      kth = probs.reshape(b, h, -1).kthvalue(cut, dim=-1).values
      if margins is not None:
        below = torch.where(probs < kth[:, :, None, None], probs,
                            torch.zeros_like(probs)).amax(dim=(-2, -1))
        margins.append(float(((kth - below) / kth).min()))
      probs = torch.where(probs < kth[:, :, None, None],
                          torch.zeros_like(probs), probs)
    y = (probs @ v).transpose(1, 2).reshape(b, n, c)
    x = x + block.ls1(attn.proj(y))
    if num_prop and n > 1:
      score = _gtp_score(probs, selection)
      order = torch.sort(score, dim=1, descending=True, stable=True).indices
      keep = max(n - 1 - num_prop, 0)
      if margins is not None and 0 < keep < n - 1:
        ranked = score.gather(1, order)
        margins.append(float(((ranked[:, keep - 1] - ranked[:, keep])
                              / ranked[:, keep - 1].abs()).min()))
      new_x, new_s, new_g = [], [], []
      for img in range(b):
        kept, prop = order[img, :keep], order[img, keep:]
        weight = graph[img][kept][:, prop]
        patches, sizes = x[img, 1:], scales[img, 1:]
        new_x.append(torch.cat([x[img, :1],
                                patches[kept] + alpha * (weight @ patches[prop])]))
        grown = sizes[kept] + alpha * (weight @ sizes[prop])
        new_s.append(torch.cat([scales[img, :1],
                                grown if token_scale else sizes[kept]]))
        new_g.append(graph[img][kept][:, kept])
      x, scales, graph = (torch.stack(new_x), torch.stack(new_s),
                          torch.stack(new_g))
    x = x + block.ls2(block.mlp(block.norm2(x)))
  return model.forward_head(model.norm(x))
