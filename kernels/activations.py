"""Activations of nextrec 0.3.1's MLP (torch defaults) and their derivatives as @triton.jit
helpers, selected by a constexpr id so each kernel compiles only the branch it uses.

expm1 / log1p / tanh are written with plain exp/log because the Triton interpreter does not
emulate libdevice; the forms below keep full relative accuracy near 0 (where 1 - exp(x)
would cancel), so fp64 tests can stay tight.
"""
import triton
import triton.language as tl

IDENTITY = tl.constexpr(0)
RELU = tl.constexpr(1)
RELU6 = tl.constexpr(2)
ELU = tl.constexpr(3)
SELU = tl.constexpr(4)
LEAKY_RELU = tl.constexpr(5)
PRELU = tl.constexpr(6)
GELU = tl.constexpr(7)
SIGMOID = tl.constexpr(8)
TANH = tl.constexpr(9)
SOFTPLUS = tl.constexpr(10)
SOFTSIGN = tl.constexpr(11)
HARDSWISH = tl.constexpr(12)
MISH = tl.constexpr(13)
SILU = tl.constexpr(14)
HARDSIGMOID = tl.constexpr(15)
TANHSHRINK = tl.constexpr(16)
SOFTSHRINK = tl.constexpr(17)

# Name -> id, exactly the names nextrec.basic.activation.activation_layer accepts (minus
# "dice", which carries its own BatchNorm and parameters and is not an MLP activation here).
_IDS = {
    "relu": RELU, "relu6": RELU6, "elu": ELU, "selu": SELU, "leaky_relu": LEAKY_RELU,
    "prelu": PRELU, "gelu": GELU, "sigmoid": SIGMOID, "tanh": TANH, "softplus": SOFTPLUS,
    "softsign": SOFTSIGN, "hardswish": HARDSWISH, "mish": MISH, "silu": SILU, "swish": SILU,
    "hardsigmoid": HARDSIGMOID, "tanhshrink": TANHSHRINK, "softshrink": SOFTSHRINK,
    "linear": IDENTITY, "identity": IDENTITY, "none": IDENTITY,
}
ACTIVATION_IDS = {name: int(act.value) for name, act in _IDS.items()}
del _IDS

SELU_ALPHA = tl.constexpr(1.6732632423543772848170429916717)
SELU_SCALE = tl.constexpr(1.0507009873554804934193349852946)
LEAKY_SLOPE = tl.constexpr(0.01)       # nn.LeakyReLU default
SOFTPLUS_THRESHOLD = tl.constexpr(20.0)  # nn.Softplus default (beta = 1)
SOFTSHRINK_LAMBDA = tl.constexpr(0.5)  # nn.Softshrink default
INV_SQRT2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
# torch's hardsigmoid backward multiplies by float(1/6) even for double tensors: match it.
HARDSIGMOID_SLOPE = tl.constexpr(0.1666666716337204)


def activation_id(name: str) -> int:
    if not isinstance(name, str):
        raise TypeError(f"activation must be a str, got {type(name).__name__}")
    key = name.lower()
    if key not in ACTIVATION_IDS:
        raise ValueError(f"unsupported activation {name!r}; expected one of {sorted(ACTIVATION_IDS)}")
    return ACTIVATION_IDS[key]


@triton.jit
def expm1(x):
    # Kahan: (exp(x) - 1) * x / log(exp(x)) cancels exp's rounding error near 0.
    u = tl.exp(x)
    um1 = u - 1.0
    log_u = tl.log(u)
    near_zero = um1 == 0.0
    r = um1 * (x / tl.where(near_zero, 1.0, log_u))
    r = tl.where(near_zero, x, r)
    r = tl.where(um1 == -1.0, -1.0, r)
    return tl.where(u == float("inf"), u, r)


@triton.jit
def log1p(x):
    # Goldberg: log(1 + x) * x / ((1 + x) - 1) cancels the rounding of 1 + x.
    u = 1.0 + x
    d = u - 1.0
    is_zero = d == 0.0
    r = tl.log(u) * (x / tl.where(is_zero, 1.0, d))
    return tl.where(is_zero, x, r)


@triton.jit
def tanh(x):
    e = expm1(-2.0 * tl.abs(x))  # in (-1, 0]
    t = -e / (2.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def softplus(x):
    # torch: x * beta > threshold -> x (also keeps exp from overflowing).
    big = x > SOFTPLUS_THRESHOLD
    return tl.where(big, x, log1p(tl.exp(tl.where(big, tl.zeros_like(x), x))))


@triton.jit
def activation_forward(z, slope, ACT: tl.constexpr):
    """act(z); `slope` is the PReLU weight (ignored otherwise)."""
    if ACT == RELU:
        y = tl.where(z < 0, tl.zeros_like(z), z)
    elif ACT == RELU6:
        y = tl.minimum(tl.where(z < 0, tl.zeros_like(z), z), tl.zeros_like(z) + 6.0)
    elif ACT == ELU:
        y = tl.where(z > 0, z, expm1(tl.minimum(z, tl.zeros_like(z))))
    elif ACT == SELU:
        y = tl.where(z > 0, z, SELU_ALPHA * expm1(tl.minimum(z, tl.zeros_like(z)))) * SELU_SCALE
    elif ACT == LEAKY_RELU:
        y = tl.where(z > 0, z, z * LEAKY_SLOPE)
    elif ACT == PRELU:
        y = tl.where(z > 0, z, z * slope)
    elif ACT == GELU:
        y = z * 0.5 * (1.0 + tl.erf(z * INV_SQRT2))
    elif ACT == SIGMOID:
        y = sigmoid(z)
    elif ACT == TANH:
        y = tanh(z)
    elif ACT == SOFTPLUS:
        y = softplus(z)
    elif ACT == SOFTSIGN:
        y = z / (1.0 + tl.abs(z))
    elif ACT == HARDSWISH:
        y = z * tl.minimum(tl.maximum(z + 3.0, tl.zeros_like(z)), tl.zeros_like(z) + 6.0) / 6.0
    elif ACT == MISH:
        y = z * tanh(softplus(z))
    elif ACT == SILU:
        y = z / (1.0 + tl.exp(-z))
    elif ACT == HARDSIGMOID:
        y = tl.minimum(tl.maximum(z + 3.0, tl.zeros_like(z)), tl.zeros_like(z) + 6.0) / 6.0
    elif ACT == TANHSHRINK:
        y = z - tanh(z)
    elif ACT == SOFTSHRINK:
        y = tl.where(z > SOFTSHRINK_LAMBDA, z - SOFTSHRINK_LAMBDA,
                     tl.where(z < -SOFTSHRINK_LAMBDA, z + SOFTSHRINK_LAMBDA, tl.zeros_like(z)))
    else:
        y = z
    return y


@triton.jit
def activation_derivative(z, slope, ACT: tl.constexpr):
    """d act / d z at z, with torch's conventions at the kinks (its backward formulas).
    Constants are combined with tensors of z's dtype: tl.where of two Python floats would
    round them to fp32 and break fp64 exactness."""
    zero = tl.zeros_like(z)
    one = zero + 1.0
    if ACT == RELU:
        d = tl.where(z > 0, one, zero)
    elif ACT == RELU6:
        d = tl.where((z > 0) & (z < 6.0), one, zero)
    elif ACT == ELU:
        d = tl.where(z > 0, one, tl.exp(tl.minimum(z, zero)))
    elif ACT == SELU:
        d = tl.where(z > 0, one, SELU_ALPHA * tl.exp(tl.minimum(z, zero))) * SELU_SCALE
    elif ACT == LEAKY_RELU:
        d = tl.where(z > 0, one, zero + LEAKY_SLOPE)
    elif ACT == PRELU:
        d = tl.where(z > 0, one, zero + slope)
    elif ACT == GELU:
        cdf = 0.5 * (1.0 + tl.erf(z * INV_SQRT2))
        d = cdf + z * tl.exp(-0.5 * z * z) * INV_SQRT_2PI
    elif ACT == SIGMOID:
        s = sigmoid(z)
        d = s * (1.0 - s)
    elif ACT == TANH:
        t = tanh(z)
        d = 1.0 - t * t
    elif ACT == SOFTPLUS:
        big = z > SOFTPLUS_THRESHOLD
        ez = tl.exp(tl.where(big, zero, z))
        d = tl.where(big, one, ez / (ez + 1.0))
    elif ACT == SOFTSIGN:
        den = 1.0 + tl.abs(z)
        d = 1.0 / (den * den)
    elif ACT == HARDSWISH:
        d = tl.where(z < -3.0, zero, tl.where(z <= 3.0, z / 3.0 + 0.5, one))
    elif ACT == MISH:
        s = sigmoid(z)
        tsp = tanh(softplus(z))
        d = tsp + z * s * (1.0 - tsp * tsp)
    elif ACT == SILU:
        s = sigmoid(z)
        d = s * (1.0 + z * (1.0 - s))
    elif ACT == HARDSIGMOID:
        d = tl.where((z > -3.0) & (z < 3.0), one, zero) * HARDSIGMOID_SLOPE
    elif ACT == TANHSHRINK:
        t = tanh(z)
        d = t * t
    elif ACT == SOFTSHRINK:
        d = tl.where((z >= -SOFTSHRINK_LAMBDA) & (z <= SOFTSHRINK_LAMBDA), zero, one)
    else:
        d = one
    return d
