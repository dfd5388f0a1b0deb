r"""Philox-4x32-10 written in torch integer ops, and open-interval uniforms and Box-Muller normals made from its words.

Philox is a counter-based generator: the block of four 32-bit words at
counter :math:`c` under key :math:`k` is a fixed function :math:`f_k(c)` (ten
rounds of multiplications and XORs), so any block of any stream is computed
directly, for all rows at once, by the same fixed number of tensor operations
whatever the number of rows. Torch has no unsigned 32-bit multiply (nor shifts
of unsigned types), so every word is held in an ``int64`` in
:math:`[0, 2^{32})` and the 64-bit product :math:`a M` of a round is formed
exactly from two 48-bit products with the multiplier's 16-bit halves
:math:`M = 2^{16} M_h + M_l`:

.. math::

    \mathrm{lo}(aM) = \bigl(a M_l + 2^{16} (a M_h \bmod 2^{16})\bigr) \bmod 2^{32}, \qquad
    \mathrm{hi}(aM) = \bigl\lfloor (a M_h + \lfloor a M_l / 2^{16} \rfloor) / 2^{16} \bigr\rfloor,

with no intermediate at or above :math:`2^{63}`: the same bits on every device.

Floats are made from the words with operations that round alike everywhere
(integer operations, exact conversions and scalings by powers of two, ``frexp``,
and IEEE ``+ - * /`` and ``sqrt``): a uniform is an odd multiple of
:math:`2^{-(b+1)}` for the type's :math:`b` fraction bits (never 0 or 1), and a
pair of normals is :math:`\rho (\cos\theta, \sin\theta)` with
:math:`\rho = \sqrt{-2 \log u}` (Box-Muller), where the logarithm and the sine
are series evaluated with those operations rather than the device's ``log``
and ``sin`` (whose last bit differs between a CPU and a GPU, and between the
vectorised and the scalar loop of one CPU kernel).

References
----------
J. K. Salmon, M. A. Moraes, R. O. Dror and D. E. Shaw, "Parallel random numbers: as easy as 1, 2, 3",
SC '11 (2011), doi:10.1145/2063384.2063405; the Random123 library (D. E. Shaw Research).
G. E. P. Box and M. E. Muller, "A note on the generation of random normal deviates",
Ann. Math. Statist. 29 (1958) 610-611.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["MASK", "ROUNDS", "Constants", "FLOAT_DTYPES", "constants", "philox4x32", "blocks", "uniform_words", "uniform_from_words", "normal_words", "normal_from_words"]

MASK = 0xFFFFFFFF
#: Philox-4x32 multipliers and Weyl key increments (Salmon et al. 2011, table 2)
M0, M1 = 0xD2511F53, 0xCD9E8D57
W0, W1 = 0x9E3779B9, 0xBB67AE85
ROUNDS = 10
#: the float types the streams fill; half types are made from float32 values with the type's own grid
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


Constants = tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], ...]


def constants(key: tuple[int, int], device: torch.device | str) -> Constants:
    r"""Per round, ``[2, 1]`` int64 views of one tensor on ``device``: the multipliers' low and high 16 bits, and the round's key words.

    Round ``r`` uses the key :math:`(k_0 + r W_0, k_1 + r W_1) \bmod 2^{32}` (Random123's key
    schedule). The lanes of :func:`_rounds` alternate between the orders ``(c0, c2)`` and
    ``(c2, c0)``, so an even round multiplies by ``(M0, M1)`` and XORs ``(k1, k0)``, an odd one
    multiplies by ``(M1, M0)`` and XORs ``(k0, k1)``.
    """
    k0, k1 = key
    rows = []
    for r in range(ROUNDS):
        m = (M0, M1) if r % 2 == 0 else (M1, M0)
        a, b = (k0 + r * W0) & MASK, (k1 + r * W1) & MASK
        rows += [(m[0] & 0xFFFF, m[1] & 0xFFFF), (m[0] >> 16, m[1] >> 16), (b, a) if r % 2 == 0 else (a, b)]
    table = torch.tensor(rows, dtype=torch.int64, device=device).unsqueeze(-1)
    return tuple((table[3 * r], table[3 * r + 1], table[3 * r + 2]) for r in range(ROUNDS))


def _rounds(x: torch.Tensor, y: torch.Tensor, consts: Constants) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The ten rounds on lanes ``x = (c0, c2)``, ``y = (c1, c3)`` (``[2, L]`` int64, overwritten); the outputs in the same lanes.

    A round maps :math:`(c_0, c_1, c_2, c_3)` to
    :math:`(\mathrm{hi}(M_1 c_2) \oplus c_1 \oplus k_0,\ \mathrm{lo}(M_1 c_2),\ \mathrm{hi}(M_0 c_0) \oplus c_3 \oplus k_1,\ \mathrm{lo}(M_0 c_0))`.
    Written on the pairs ``x`` and ``y`` it leaves the lanes of both swapped, ``(c2, c0)`` and
    ``(c3, c1)``, and the next round swaps them back: twelve operations a round, none of them a copy.
    """
    for low16, high16, key in consts:
        hi = x * high16  # a M_h < 2^48
        x.mul_(low16)  # a M_l < 2^48
        lo = hi & 0xFFFF
        lo.bitwise_left_shift_(16).add_(x).bitwise_and_(MASK)
        hi.add_(x.bitwise_right_shift_(16)).bitwise_right_shift_(16)
        hi[0].bitwise_xor_(y[1])
        hi[1].bitwise_xor_(y[0])
        x, y = hi.bitwise_xor_(key), lo
    return x, y


def philox4x32(counter: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
    """Philox-4x32-10 of ``counter`` (int64 ``[4, ...]``, words in :math:`[0, 2^{32})`) under ``key`` (two 32-bit words): ``[4, ...]``.

    The function of Random123's ``philox4x32`` with ten rounds (word 0 is the least significant).
    """
    shape = counter.shape[1:]
    c = counter.reshape(4, -1)
    x, y = _rounds(torch.stack((c[0], c[2])), torch.stack((c[1], c[3])), constants(key, counter.device))
    return torch.stack((x[0], y[0], x[1], y[1])).reshape(4, *shape)


def blocks(position: torch.Tensor, lanes: torch.Tensor, count: int, consts: Constants) -> torch.Tensor:
    """The words of ``count`` blocks per row, ``[n, 4 count]``: row ``i``'s blocks at counters ``position[i] + j``.

    ``position`` ``[n]`` int64 holds the counter's words 0-1 (a block index below :math:`2^{63}`);
    ``lanes`` ``[2, n]`` its words 2-3 (the row's stream: the low and high words of its dataset
    index). A row's words come in stream order: block by block, each block's four words in order.
    """
    n = position.shape[0]
    c = position.unsqueeze(1) + torch.arange(count, device=position.device)  # [n, count]
    x = torch.stack((c & MASK, lanes[0].unsqueeze(1).expand(n, count))).view(2, -1)
    y = torch.stack((c.bitwise_right_shift_(32), lanes[1].unsqueeze(1).expand(n, count))).view(2, -1)
    x, y = _rounds(x, y, consts)
    return torch.stack((x[0], y[0], x[1], y[1]), 1).view(n, 4 * count)


def _fraction_bits(dtype: torch.dtype) -> int:
    return round(-math.log2(torch.finfo(dtype).eps))


def uniform_words(count: int, dtype: torch.dtype) -> int:
    """Words that :func:`uniform_from_words` takes for ``count`` values: two per float64, one per narrower float."""
    return 2 * count if dtype == torch.float64 else count


def _open_uniform(hi: torch.Tensor, lo: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """:math:`(2k + 1) / 2^{b+1}` in ``dtype`` (float32 or float64) for :math:`k` the top ``b`` bits of ``hi`` (then ``lo``): in (0, 1), exact."""
    if dtype == torch.float64:  # k = 2^20 hi + (lo >> 12): 52 bits
        odd = (hi << 21).bitwise_or_(lo >> 11).bitwise_or_(1)  # type: ignore[operator]
        return odd.to(torch.float64).mul_(2.0**-53)
    b = _fraction_bits(dtype)
    odd = (hi >> (31 - b)).bitwise_or_(1)
    return odd.to(torch.float32).mul_(2.0 ** -(b + 1))


def uniform_from_words(words: torch.Tensor, count: int, dtype: torch.dtype) -> torch.Tensor:
    """``count`` U(0, 1) values per row, ``[n, count]``, from a row's first :func:`uniform_words` words ``[n, >= that]``.

    Value ``i`` is :math:`(2k + 1) / 2^{b+1}` for :math:`k` the top ``b`` fraction bits of
    ``dtype`` (52, 23, 10 or 7) of word ``i`` (float64: word ``i`` then word ``count + i``), so
    every value is exact, in the open interval, and a float64 draw is the float32 draw made from
    the same words to within :math:`2^{-24}`.
    """
    hi = words[:, :count]
    if dtype == torch.float64:
        return _open_uniform(hi, words[:, count : 2 * count], dtype)
    u = _open_uniform(hi, None, dtype)
    return u if dtype == torch.float32 else u.to(dtype)


# -------------------------------------------------------------------------------- normals

def _series(coefficients: list[float], dtype: torch.dtype) -> list[float]:
    """Coefficients rounded to ``dtype``, so a Python scalar means one value on every device."""
    return [float(np.float32(c)) if dtype == torch.float32 else float(c) for c in coefficients]


#: :math:`\log m = 2\,\mathrm{atanh}\,s = \sum_j 2 s^{2j+1} / (2j + 1)`, :math:`s = (m - 1)/(m + 1)`, :math:`|s| \le 3 - 2\sqrt 2`:
#: the first term left out is below :math:`2^{-55}` (float64) or :math:`2^{-28}` (float32) of the sum
_LOG = {torch.float64: _series([2 / (2 * j + 1) for j in range(10)], torch.float64), torch.float32: _series([2 / (2 * j + 1) for j in range(5)], torch.float32)}
#: :math:`\sin(\pi r / 2) = \sum_j (-1)^j (\pi/2)^{2j+1} r^{2j+1} / (2j+1)!`, :math:`|r| < 1/2`: the first term left out is below
#: :math:`2^{-54}` (float64) or :math:`2^{-28}` (float32) of the sum
_SIN = {torch.float64: _series([(-1) ** j * (math.pi / 2) ** (2 * j + 1) / math.factorial(2 * j + 1) for j in range(8)], torch.float64),
        torch.float32: _series([(-1) ** j * (math.pi / 2) ** (2 * j + 1) / math.factorial(2 * j + 1) for j in range(5)], torch.float32)}


def _horner(z: torch.Tensor, coefficients: list[float]) -> torch.Tensor:
    r""":math:`\sum_j c_j z^j` by Horner's rule, one IEEE multiply and one add a step (no fused multiply-add)."""
    p = z * coefficients[-1]
    for c in reversed(coefficients[1:-1]):
        p.add_(c).mul_(z)
    return p.add_(coefficients[0])


def _log(u: torch.Tensor) -> torch.Tensor:
    r"""``log(u)`` for ``u > 0`` (float32 or float64) to about one unit in the last place, from ``frexp`` and the series of ``atanh``.

    :math:`u = m 2^e` with :math:`m \in [\sqrt{1/2}, \sqrt 2)`, :math:`\log u = e \log 2 + 2\,\mathrm{atanh}\,\frac{m - 1}{m + 1}`.
    """
    m, e = torch.frexp(u)  # m in [1/2, 1)
    low = m < math.sqrt(0.5)
    m = torch.where(low, m * 2, m)
    s = (m - 1).div_(m + 1)
    log_m = _horner(s * s, _LOG[u.dtype]).mul_(s)
    return (e - low.to(e.dtype)).to(u.dtype).mul_(math.log(2)).add_(log_m)


def normal_words(count: int, dtype: torch.dtype) -> int:
    """Words that :func:`normal_from_words` takes for ``count`` values: two per pair of normals (four in float64)."""
    pairs = (count + 1) // 2
    return 4 * pairs if dtype == torch.float64 else 2 * pairs


def normal_from_words(words: torch.Tensor, count: int, dtype: torch.dtype) -> torch.Tensor:
    r"""``count`` standard normals per row, ``[n, count]``, from a row's first :func:`normal_words` words, by Box-Muller.

    With :math:`P = \lceil count / 2 \rceil` pairs, pair :math:`i` takes its radius from a uniform
    :math:`u` (word :math:`i`) and its angle from word :math:`P + i` (float64: the words
    :math:`2P + i` and :math:`3P + i` add the low bits, as in :func:`uniform_from_words`): the
    angle's top two bits pick the quadrant :math:`q`, the rest a uniform :math:`r \in (-1/2, 1/2)`,
    and

    .. math::

        (z_i, z_{P+i}) = \sqrt{-2 \log u}\; R^{q} \bigl(\cos\tfrac{\pi r}{2}, \sin\tfrac{\pi r}{2}\bigr),

    :math:`R` the quarter turn, so the angle :math:`\tfrac{\pi}{2}(q + r)` is uniform on the circle.
    :math:`\sin` is its series and :math:`\cos = \sqrt{1 - \sin^2}` (at least :math:`\sqrt{1/2}`
    here). Half types are float32 values rounded.
    """
    pairs = (count + 1) // 2
    ft = torch.float64 if dtype == torch.float64 else torch.float32
    wide = ft == torch.float64
    a, t = words[:, :pairs], words[:, pairs : 2 * pairs]
    u = _open_uniform(a, words[:, 2 * pairs : 3 * pairs] if wide else None, ft)
    rho = _log(u).mul_(-2).sqrt_()
    q = t >> 30
    if wide:  # r from 50 bits: t's low 30 and the low word's top 20
        odd = (t & 0x3FFFFFFF).bitwise_left_shift_(21).bitwise_or_(words[:, 3 * pairs : 4 * pairs] >> 11).bitwise_or_(1)
        r = odd.to(ft).mul_(2.0**-51).sub_(0.5)
    else:  # r from t's bits 9..29
        r = (t >> 8).bitwise_and_(0x3FFFFF).bitwise_or_(1).to(ft).mul_(2.0**-22).sub_(0.5)
    sin = _horner(r * r, _SIN[ft]).mul_(r)
    cos = (sin * sin).neg_().add_(1).sqrt_()
    odd_q = (q & 1).bool()
    x, y = torch.where(odd_q, sin, cos), torch.where(odd_q, cos, sin)  # R^q (cos, sin) = (+-x, +-y)
    minus = rho.neg()
    z = torch.cat((torch.where(((q + 1) & 2).bool(), minus, rho).mul_(x), torch.where((q & 2).bool(), minus, rho).mul_(y)), 1)
    z = z[:, :count]
    return z if dtype == ft else z.to(dtype)
