r"""Philox-4x32-10 written in torch integer ops, and open-interval uniforms and Box-Muller normals made from its words.

Philox is a counter-based generator: the block of four 32-bit words at
counter :math:`c` under key :math:`k` is a fixed function :math:`f_k(c)` (ten
rounds of multiplications and XORs), so any block of any stream is computed
directly, for all rows at once, by the same fixed number of tensor operations
whatever the number of rows. Torch has no unsigned 32-bit multiply (nor shifts
of unsigned types), so every word is held in an ``int64`` in
:math:`[0, 2^{32})`. The 64-bit product :math:`a M` of a round is one ``int64``
multiply where the device's products wrap modulo :math:`2^{64}` (CPUs and GPUs
do; :func:`products_wrap` checks it once per device), read as
:math:`\mathrm{lo} = p \wedge (2^{32} - 1)`, :math:`\mathrm{hi} = (p \gg 32) \wedge (2^{32} - 1)`;
elsewhere it is formed exactly from two 48-bit products with the multiplier's
16-bit halves :math:`M = 2^{16} M_h + M_l`:

.. math::

    \mathrm{lo}(aM) = \bigl(a M_l + 2^{16} (a M_h \bmod 2^{16})\bigr) \bmod 2^{32}, \qquad
    \mathrm{hi}(aM) = \bigl\lfloor (a M_h + \lfloor a M_l / 2^{16} \rfloor) / 2^{16} \bigr\rfloor,

with no intermediate at or above :math:`2^{63}`. Both give the same bits.

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
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "MASK",
    "ROUNDS",
    "Constants",
    "FLOAT_DTYPES",
    "products_wrap",
    "constants",
    "philox4x32",
    "blocks",
    "uniform_blocks",
    "uniform_from_blocks",
    "normal_blocks",
    "normal_from_blocks",
    "draw",
]

MASK = 0xFFFFFFFF
#: Philox-4x32 multipliers and Weyl key increments (Salmon et al. 2011, table 2)
M0, M1 = 0xD2511F53, 0xCD9E8D57
W0, W1 = 0x9E3779B9, 0xBB67AE85
ROUNDS = 10
#: the float types the streams fill; half types are made from float32 values with the type's own grid
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Constants:
    """A key's per-round constants on one device, and how that device forms the round's products (:func:`constants`)."""

    #: per round, ``[2, 1, 1]`` int64: the multipliers, their low and high 16 bits, and the round's key words, in the round's lane order
    rounds: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], ...]
    #: whether the device's int64 products wrap modulo 2^64 (one multiply a round) or the product is built from 48-bit halves
    wrap: bool


_WRAP: dict[str, bool] = {}


def products_wrap(device: torch.device | str) -> bool:
    """Whether ``device``'s int64 multiply wraps modulo :math:`2^{64}` in its vectorised and scalar loops (checked once per device on 67 products)."""
    name = str(torch.device(device))
    if name not in _WRAP:
        a = [
            (0x9E3779B97F4A7C15 * i) >> 32 for i in range(1, 68)
        ]  # 32-bit words, most with products above 2^63
        got = (torch.tensor(a, dtype=torch.int64, device=device) * M0).tolist()
        _WRAP[name] = [g % 2**64 for g in got] == [v * M0 % 2**64 for v in a]
    return _WRAP[name]


def constants(
    key: tuple[int, int], device: torch.device | str, wrap: bool | None = None
) -> Constants:
    r"""The per-round constants of ``key`` on ``device`` (``wrap``: how to form products; default :func:`products_wrap`).

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
        rows += [
            m,
            (m[0] & 0xFFFF, m[1] & 0xFFFF),
            (m[0] >> 16, m[1] >> 16),
            (b, a) if r % 2 == 0 else (a, b),
        ]
    table = torch.tensor(rows, dtype=torch.int64, device=device).view(-1, 2, 1, 1)
    return Constants(
        tuple(tuple(table[4 * r : 4 * r + 4]) for r in range(ROUNDS)),
        products_wrap(device) if wrap is None else wrap,
    )  # type: ignore[misc]


def _rounds(
    x: torch.Tensor, y: torch.Tensor, consts: Constants
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The ten rounds on lanes ``x = (c0, c2)``, ``y = (c1, c3)`` (``[2, n, L]`` int64, overwritten); the outputs in the same lanes.

    A round maps :math:`(c_0, c_1, c_2, c_3)` to
    :math:`(\mathrm{hi}(M_1 c_2) \oplus c_1 \oplus k_0,\ \mathrm{lo}(M_1 c_2),\ \mathrm{hi}(M_0 c_0) \oplus c_3 \oplus k_1,\ \mathrm{lo}(M_0 c_0))`.
    Written on the pairs ``x`` and ``y`` it leaves the lanes of both swapped, ``(c2, c0)`` and
    ``(c3, c1)``, and the next round swaps them back: seven operations a round where products
    wrap (twelve otherwise), none of them a copy. Every operation writes into one of three
    buffers (``x``, ``y`` and one more), which rotate: a round allocates nothing.
    """
    spare = torch.empty_like(x)
    for m, low16, high16, key in consts.rounds:
        if consts.wrap:
            torch.mul(x, m, out=spare)  # the product modulo 2^64
            torch.bitwise_and(spare, MASK, out=x)  # lo: x is read
            spare.bitwise_right_shift_(32)  # hi, sign-extended: masked below
        else:
            torch.mul(x, high16, out=spare)  # a M_h < 2^48
            x.mul_(low16)  # a M_l < 2^48
            lo = spare & 0xFFFF
            lo.bitwise_left_shift_(16).add_(x).bitwise_and_(MASK)
            spare.add_(x.bitwise_right_shift_(16)).bitwise_right_shift_(16)
            x.copy_(lo)
        (h0, h1), (y0, y1) = spare.unbind(), y.unbind()
        h0.bitwise_xor_(y1)
        h1.bitwise_xor_(y0)
        spare.bitwise_xor_(key).bitwise_and_(MASK)
        x, y, spare = spare, x, y
    return x, y


def philox4x32(
    counter: torch.Tensor, key: tuple[int, int], wrap: bool | None = None
) -> torch.Tensor:
    """Philox-4x32-10 of ``counter`` (int64 ``[4, ...]``, words in :math:`[0, 2^{32})`) under ``key`` (two 32-bit words): ``[4, ...]``.

    The function of Random123's ``philox4x32`` with ten rounds (word 0 is the least significant);
    ``wrap`` as :func:`constants`.
    """
    shape = counter.shape[1:]
    c = counter.reshape(4, -1)
    x, y = _rounds(
        torch.stack((c[0], c[2])).unsqueeze(-1),
        torch.stack((c[1], c[3])).unsqueeze(-1),
        constants(key, counter.device, wrap),
    )
    return torch.stack((x[0], y[0], x[1], y[1])).reshape(4, *shape)


def blocks(
    position: torch.Tensor, lanes: torch.Tensor, count: int, consts: Constants
) -> tuple[torch.Tensor, torch.Tensor]:
    """The words of ``count`` blocks per row: ``(x, y)``, each ``[2, n, count]`` int64, ``x`` words 0 and 2, ``y`` words 1 and 3.

    Row ``i``'s block ``j`` is Philox at the counter ``(position[i] + j, lanes[:, i])``:
    ``position`` ``[n]`` int64 holds the counter's words 0-1 (a block index below :math:`2^{63}`),
    ``lanes`` ``[2, n]`` its words 2-3 (the row's stream: the low and high words of its dataset
    index).
    """
    n = position.shape[0]
    x, y = (torch.empty(2, n, count, dtype=torch.int64, device=position.device) for _ in "xy")
    c = torch.add(
        position.unsqueeze(1), torch.arange(count, device=position.device), out=y[0]
    )  # [n, count]
    torch.bitwise_and(c, MASK, out=x[0])
    c.bitwise_right_shift_(32)
    x[1].copy_(lanes[0].unsqueeze(1))
    y[1].copy_(lanes[1].unsqueeze(1))
    return _rounds(x, y, consts)


def _words(
    position: torch.Tensor, lanes: torch.Tensor, count: int, consts: Constants
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`blocks` written for ``torch.compile`` (four words apart, no ``out=`` and no buffers: one fused loop), for devices whose products wrap."""
    c0 = position.unsqueeze(1) + torch.arange(count, device=position.device)
    c1, c2, c3 = c0 >> 32, lanes[0].unsqueeze(1).expand_as(c0), lanes[1].unsqueeze(1).expand_as(c0)
    c0 = c0 & MASK
    for r, (_, _, _, key) in enumerate(consts.rounds):
        k = key.view(2, 1) if r % 2 == 0 else key.flip(0).view(2, 1)  # (k1, k0)
        p0, p1 = c0 * M0, c2 * M1
        c0, c1, c2, c3 = (
            ((p1 >> 32) & MASK) ^ c1 ^ k[1],
            p1 & MASK,
            ((p0 >> 32) & MASK) ^ c3 ^ k[0],
            p0 & MASK,
        )
    return torch.stack((c0, c2)), torch.stack((c1, c3))


def _fraction_bits(dtype: torch.dtype) -> int:
    return round(-math.log2(torch.finfo(dtype).eps))


def uniform_blocks(count: int, dtype: torch.dtype) -> int:
    """Blocks per row that :func:`uniform_from_blocks` takes for ``count`` values: :math:`B = \\lceil count / 4 \\rceil` (float64: :math:`2B`)."""
    b = -(-count // 4)
    return 2 * b if dtype == torch.float64 else b


def _open_uniform(hi: torch.Tensor, lo: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """:math:`(2k + 1) / 2^{b+1}` in ``dtype`` (float32 or float64) for :math:`k` the top ``b`` bits of ``hi`` (then ``lo``): in (0, 1), exact."""
    if dtype == torch.float64:  # k = 2^20 hi + (lo >> 12): 52 bits
        odd = (hi << 21).bitwise_or_(lo >> 11).bitwise_or_(1)  # type: ignore[operator]
        return odd.to(torch.float64).mul_(2.0**-53)
    b = _fraction_bits(dtype)
    return (hi >> (32 - b)).to(torch.float32).add_(0.5).mul_(2.0**-b)


def _rows(x: torch.Tensor, y: torch.Tensor, count: int) -> torch.Tensor:
    """Values ``[2, n, B]`` of words 0 and 2 (``x``) and 1 and 3 (``y``) laid out row by row, word after word: ``[n, count]``."""
    (x0, x1), (y0, y1) = x.unbind(), y.unbind()
    return torch.stack((x0, y0, x1, y1), 1).flatten(1)[:, :count]


def uniform_from_blocks(
    x: torch.Tensor, y: torch.Tensor, count: int, dtype: torch.dtype
) -> torch.Tensor:
    r"""``count`` U(0, 1) values per row, ``[n, count]``, from :func:`uniform_blocks` blocks.

    Value :math:`v = kB + j` of a row is word :math:`k` of its block :math:`j`, as
    :math:`(2m + 1) / 2^{b+1}` for :math:`m` the word's top ``b`` bits (the fraction bits of
    ``dtype``: 52, 23, 10 or 7; float64 adds the top 20 bits of word :math:`k` of block
    :math:`B + j`), so every value is exact, in the open interval, and a float64 draw is the
    float32 draw made from the same blocks to within :math:`2^{-24}`.
    """
    if dtype == torch.float64:
        b = x.shape[-1] // 2
        ux, uy = (
            _open_uniform(x[..., :b], x[..., b:], dtype),
            _open_uniform(y[..., :b], y[..., b:], dtype),
        )
    else:
        ux, uy = _open_uniform(x, None, dtype), _open_uniform(y, None, dtype)
    u = _rows(ux, uy, count)
    return u if u.dtype == dtype else u.to(dtype)


# -------------------------------------------------------------------------------- normals


def _series(coefficients: list[float], dtype: torch.dtype) -> list[float]:
    """Coefficients rounded to ``dtype``, so a Python scalar means one value on every device."""
    return [float(np.float32(c)) if dtype == torch.float32 else float(c) for c in coefficients]


#: :math:`\log m = 2\,\mathrm{atanh}\,s = \sum_j 2 s^{2j+1} / (2j + 1)`, :math:`s = (m - 1)/(m + 1) \in [-1/3, 0)` for :math:`m \in [1/2, 1)`:
#: the first term left out is below :math:`2^{-55}` (float64) or :math:`2^{-26}` (float32) of the sum
_LOG = {
    torch.float64: _series([2 / (2 * j + 1) for j in range(16)], torch.float64),
    torch.float32: _series([2 / (2 * j + 1) for j in range(7)], torch.float32),
}
#: :math:`\sin(\pi r / 2) = \sum_j (-1)^j (\pi/2)^{2j+1} r^{2j+1} / (2j+1)!`, :math:`|r| < 1/2`: the first term left out is below
#: :math:`2^{-54}` (float64) or :math:`2^{-28}` (float32) of the sum
_SIN = {
    torch.float64: _series(
        [(-1) ** j * (math.pi / 2) ** (2 * j + 1) / math.factorial(2 * j + 1) for j in range(8)],
        torch.float64,
    ),
    torch.float32: _series(
        [(-1) ** j * (math.pi / 2) ** (2 * j + 1) / math.factorial(2 * j + 1) for j in range(5)],
        torch.float32,
    ),
}


def _horner(z: torch.Tensor, coefficients: list[float]) -> torch.Tensor:
    r""":math:`\sum_j c_j z^j` by Horner's rule, one IEEE multiply and one add a step (no fused multiply-add)."""
    p = z * coefficients[-1]
    for c in reversed(coefficients[1:-1]):
        p.add_(c).mul_(z)
    return p.add_(coefficients[0])


#: float type -> (its bits as an integer type, fraction bits, exponent bias of a fraction in [1/2, 1))
_LAYOUT = {torch.float32: (torch.int32, 23, 126), torch.float64: (torch.int64, 52, 1022)}


def _log(u: torch.Tensor) -> torch.Tensor:
    r"""``log(u)`` for normal floats ``u`` in (0, 1) (float32 or float64) to about one unit in the last place.

    :math:`u = m 2^e` with :math:`m \in [1/2, 1)` read off ``u``'s bits, and
    :math:`\log u = e \log 2 + 2\,\mathrm{atanh}\,\frac{m - 1}{m + 1}` (both terms negative: no cancellation).
    """
    kind, fraction, bias = _LAYOUT[u.dtype]
    bits = u.view(kind)
    e = (bits >> fraction).sub_(bias).to(u.dtype)
    m = (bits & ((1 << fraction) - 1)).bitwise_or_(bias << fraction).view(u.dtype)
    s = (m - 1).div_(m + 1)
    log_m = _horner(s * s, _LOG[u.dtype]).mul_(s)
    return e.mul_(math.log(2)).add_(log_m)


def normal_blocks(count: int, dtype: torch.dtype) -> int:
    """Blocks per row that :func:`normal_from_blocks` takes for ``count`` values: two pairs a block, :math:`B = \\lceil count / 4 \\rceil` (float64: :math:`2B`)."""
    return uniform_blocks(count, dtype)


def normal_from_blocks(
    x: torch.Tensor, y: torch.Tensor, count: int, dtype: torch.dtype
) -> torch.Tensor:
    r"""``count`` standard normals per row, ``[n, count]``, from :func:`normal_blocks` blocks, by Box-Muller.

    Block :math:`j` of a row gives two pairs, :math:`l = 0, 1`: each takes its radius from the uniform
    :math:`u` of word :math:`2l` and its angle from word :math:`2l + 1` (float64: the same words of
    block :math:`B + j` add low bits, as in :func:`uniform_from_blocks`): the angle word's top two
    bits pick the quadrant :math:`q`, the rest a uniform :math:`r \in (-1/2, 1/2)`, and values
    :math:`2lB + j` and :math:`(2l + 1)B + j` are

    .. math::

        \sqrt{-2 \log u}\; R^{q} \bigl(\cos\tfrac{\pi r}{2}, \sin\tfrac{\pi r}{2}\bigr),

    :math:`R` the quarter turn, so the angle :math:`\tfrac{\pi}{2}(q + r)` is uniform on the circle.
    :math:`\sin` is its series and :math:`\cos = \sqrt{1 - \sin^2}` (at least :math:`\sqrt{1/2}`
    here). Half types are float32 values rounded.
    """
    rho, sin, cos, odd, flip = _polar(x, y, dtype)
    return _combine(rho.sqrt_(), sin, cos.sqrt_(), odd, flip, count, dtype)


def _polar(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    r"""Box-Muller's :math:`(-2 \log u,\ \sin,\ 1 - \sin^2,\ [q \text{ odd}],\ (-1)^{\lfloor q/2 \rfloor})` of :func:`normal_from_blocks` (the two square roots left out)."""
    ft = torch.float64 if dtype == torch.float64 else torch.float32
    if ft == torch.float64:
        b = x.shape[-1] // 2
        t = y[..., :b]
        u = _open_uniform(x[..., :b], x[..., b:], ft)
        # r from 50 bits: t's low 30 and the low word's top 20
        r = (
            (t & 0x3FFFFFFF)
            .bitwise_left_shift_(21)
            .bitwise_or_(y[..., b:] >> 11)
            .bitwise_or_(1)
            .to(ft)
            .mul_(2.0**-51)
            .sub_(0.5)
        )
        odd, flip = (
            (t >> 30).bitwise_and_(1).to(ft),
            (t >> 31).to(ft).mul_(-2).add_(1),
        )  # q & 1, (-1)^(q >> 1)
    else:
        u = _open_uniform(x, None, ft)
        angle = (
            (y >> 8).to(ft).mul_(2.0**-22)
        )  # in [0, 4): the quadrant q and, from t's bits 8..29, r (all exact)
        quadrant = angle.floor()
        r = angle.sub_(quadrant).add_(2.0**-23 - 0.5)
        half = quadrant.mul(0.5).floor_()
        odd, flip = quadrant.sub_(half * 2), half.mul_(-2).add_(1)
    sin = _horner(r * r, _SIN[ft]).mul_(r)
    return _log(u).mul_(-2), sin, torch.rsub(sin * sin, 1), odd, flip


def _combine(
    rho: torch.Tensor,
    sin: torch.Tensor,
    cos: torch.Tensor,
    odd: torch.Tensor,
    flip: torch.Tensor,
    count: int,
    dtype: torch.dtype,
    layout: tuple[tuple[int, ...], int] | None = None,
) -> torch.Tensor:
    r"""The values of :func:`normal_from_blocks` from the radius :math:`\rho`, the quarter angle's sine and cosine and the quadrant (``odd``, ``flip``)."""
    # R^q (cos, sin) = (a cos - g sin, a sin + g cos), (a, g) = (1, 0), (0, 1), (-1, 0), (0, -1): with the radius folded in,
    # g = rho flip [q odd], a = rho flip - g; every product and sum below is exact but the last two
    radius = rho.mul_(flip)
    g = odd.mul_(radius)
    a = radius.sub_(g)
    zx, zy = (a * cos).sub_(g * sin), a.mul_(sin).add_(g.mul_(cos))
    z = _rows(zx, zy, count)
    return _place(z if z.dtype == dtype else z.to(dtype), layout)


def _place(values: torch.Tensor, layout: tuple[tuple[int, ...], int] | None) -> torch.Tensor:
    """Values ``[n, count]`` laid out as ``layout = (rest, dim)`` says: shape ``rest`` with the rows inserted as dim ``dim`` (None: as they are)."""
    if layout is None:
        return values
    rest, dim = layout
    return values.view(values.shape[0], *rest).movedim(0, dim).contiguous()


# -------------------------------------------------------------------------------- draws, eager or compiled


def _uniforms(
    position: torch.Tensor,
    lanes: torch.Tensor,
    layout: tuple[tuple[int, ...], int],
    dtype: torch.dtype,
    consts: Constants,
) -> torch.Tensor:
    count = math.prod(layout[0])
    x, y = _words(position, lanes, uniform_blocks(count, dtype), consts)
    return _place(uniform_from_blocks(x, y, count, dtype), layout)


#: per kind and float type: whether the compiled draws work here (False: compiling failed, or gave other bits than eager)
_COMPILED: dict[tuple[str, torch.dtype], bool] = {}
#: the pieces compiled apart: one kernel of several outputs would compute the rounds again for each
_PIECES = {"words": _words, "polar": _polar, "combine": _combine, "uniform": _uniforms}
_KERNELS: dict[str, Callable[..., Any]] = {}


def _kernel(name: str) -> Callable[..., Any]:
    """The ``torch.compile`` of piece ``name`` of a draw (made on first use: compiling happens at its first call)."""
    if name not in _KERNELS:
        _KERNELS[name] = torch.compile(_PIECES[name], dynamic=True)
    return _KERNELS[name]


def _compiled_draw(
    kind: str,
    position: torch.Tensor,
    lanes: torch.Tensor,
    layout: tuple[tuple[int, ...], int],
    dtype: torch.dtype,
    consts: Constants,
) -> torch.Tensor:
    """:func:`draw` by the ``torch.compile`` kernels: the words, the uniforms, the series and the products fused; the square roots eager."""
    if kind == "uniform":
        return _kernel("uniform")(position, lanes, layout, dtype, consts)
    count = math.prod(layout[0])
    x, y = _kernel("words")(position, lanes, normal_blocks(count, dtype), consts)
    rho, sin, cos, odd, flip = _kernel("polar")(x, y, dtype)
    return _kernel("combine")(rho.sqrt_(), sin, cos.sqrt_(), odd, flip, count, dtype, layout)


def _compiles(kind: str, dtype: torch.dtype) -> bool:
    """Whether the compiled draws of ``kind`` in ``dtype`` work here: compiled once per process and checked against eager on 74 values of 3 rows."""
    if (kind, dtype) not in _COMPILED:
        position = torch.tensor([0, 2**32 - 3, 2**62 + 5])
        lanes = torch.tensor([[0, MASK, 7], [MASK, 0, 2**31]])
        consts = constants((0x9E3779B9, MASK), "cpu", wrap=True)
        layout = ((2, 37), 1)  # [2, 3, 37]: 74 values a row
        try:
            got = _compiled_draw(kind, position, lanes, layout, dtype, consts)
            ok = torch.equal(got, draw(kind, position, lanes, layout, dtype, consts))
            if not ok:
                warnings.warn(
                    f"compiled {kind} draws in {dtype} differ from eager: eager", stacklevel=4
                )
        except Exception as exc:  # no C++ compiler, or an unsupported platform
            warnings.warn(f"compiled streams fall back to eager: {exc}", stacklevel=4)
            ok = False
        _COMPILED[kind, dtype] = ok
    return _COMPILED[kind, dtype]


def draw(
    kind: str,
    position: torch.Tensor,
    lanes: torch.Tensor,
    layout: tuple[tuple[int, ...], int],
    dtype: torch.dtype,
    consts: Constants,
    compiled: bool = False,
) -> torch.Tensor:
    r"""Values of ``kind`` (``"normal"`` or ``"uniform"``) from the blocks at ``position`` (:func:`blocks`): ``layout = (rest, dim)``, shape ``rest`` with the rows inserted as dim ``dim``.

    Row ``i`` gets :math:`\prod` ``rest`` values (:func:`normal_from_blocks`, :func:`uniform_from_blocks`), in ``rest``'s order.

    ``compiled``: on a CPU whose products wrap, make them with ``torch.compile`` kernels: the
    words (the four words of a block apart, the rounds in one loop), the uniforms, the series
    and the products fused, the same IEEE operations in the same order; the two square roots
    of Box-Muller stay eager ops (torch's CPU ``sqrt`` is not always correctly rounded, the
    compiled one is: about 0.7% of values would differ in the last bit). The same bits: each
    kind and type is checked against the eager ops once per process, and falls back to them
    where compiling fails or the check does. The first draw of a kind, type and shape compiles
    (seconds); a new shape may compile again (``dynamic=True`` keeps that to the first few;
    past torch's recompile limit a piece runs as eager ops, the same bits).
    """
    if compiled and position.device.type == "cpu" and consts.wrap and _compiles(kind, dtype):
        return _compiled_draw(kind, position, lanes, layout, dtype, consts)
    count = math.prod(layout[0])
    if kind == "normal":
        x, y = blocks(position, lanes, normal_blocks(count, dtype), consts)
        return _place(normal_from_blocks(x, y, count, dtype), layout)
    x, y = blocks(position, lanes, uniform_blocks(count, dtype), consts)
    return _place(uniform_from_blocks(x, y, count, dtype), layout)
