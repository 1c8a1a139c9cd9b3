//! Per-sample noise streams that equal PyTorch's CPU generator.
//!
//! A port of libtorch's `CPUGeneratorImpl` (an mt19937, `aten/src/ATen/core/MT19937RNGEngine.h`) and of
//! `torch.randn` on a float CPU tensor (`aten/src/ATen/native/cpu/DistributionTemplates.h`, `normal_fill`
//! with the AVX2 `NormalFill16`, whose `log256_ps` / `sincos256_ps` come from
//! `aten/src/ATen/native/cpu/avx_mathfun.h`). With these, `TorchGenerator::new(s).randn(n)` returns the
//! same floats as `torch.randn(n, generator=torch.Generator().manual_seed(s))` on an AVX2 build of
//! libtorch 2.13, bit for bit; the parity test checks it against real torch output.
//!
//! Owning the stream in Rust (instead of libtorch's process-global generator) is what lets every sample
//! of a job draw from its own seed, whatever device, thread or batch it lands in.

const N: usize = 624;
const M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UMASK: u32 = 0x8000_0000;
const LMASK: u32 = 0x7fff_ffff;

/// The Mersenne Twister exactly as libtorch seeds and steps it.
#[derive(Clone)]
struct Mt19937 {
    state: [u32; N],
    left: usize,
    next: usize,
}

impl Mt19937 {
    fn new(seed: u64) -> Self {
        // libtorch keeps only the low 32 bits of the 64-bit seed (`init_with_uint32`).
        let mut state = [0u32; N];
        state[0] = (seed & 0xffff_ffff) as u32;
        for j in 1..N {
            state[j] =
                1_812_433_253u32.wrapping_mul(state[j - 1] ^ (state[j - 1] >> 30)).wrapping_add(j as u32);
        }
        Self { state, left: 1, next: 0 }
    }

    fn twist(u: u32, v: u32) -> u32 {
        let mixed = (u & UMASK) | (v & LMASK);
        (mixed >> 1) ^ if v & 1 == 1 { MATRIX_A } else { 0 }
    }

    fn next_state(&mut self) {
        let s = &mut self.state;
        for j in 0..N - M {
            s[j] = s[j + M] ^ Self::twist(s[j], s[j + 1]);
        }
        for j in N - M..N - 1 {
            s[j] = s[j + M - N] ^ Self::twist(s[j], s[j + 1]);
        }
        s[N - 1] = s[M - 1] ^ Self::twist(s[N - 1], s[0]);
        self.left = N;
        self.next = 0;
    }

    fn next_u32(&mut self) -> u32 {
        self.left -= 1;
        if self.left == 0 {
            self.next_state();
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }
}

/// A `torch.Generator("cpu")` seeded with `manual_seed(seed)`.
#[derive(Clone)]
pub struct TorchGenerator {
    engine: Mt19937,
    /// Box-Muller's second value, cached by the scalar (`numel < 16`) double path as libtorch does.
    next_double_normal: Option<f64>,
}

impl TorchGenerator {
    pub fn new(seed: u64) -> Self {
        Self { engine: Mt19937::new(seed), next_double_normal: None }
    }

    /// `uniform_real_distribution<float>(0, 1)`: the low 24 bits of one 32-bit draw.
    fn uniform_f32(&mut self) -> f32 {
        let v = self.engine.next_u32() & ((1 << 24) - 1);
        v as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// `uniform_real_distribution<double>(0, 1)`: the low 53 bits of a 64-bit draw (first draw high).
    fn uniform_f64(&mut self) -> f64 {
        let hi = self.engine.next_u32() as u64;
        let lo = self.engine.next_u32() as u64;
        let v = ((hi << 32) | lo) & ((1u64 << 53) - 1);
        v as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// `normal_distribution<double>(0, 1)`, the path of tensors with fewer than 16 elements.
    fn normal_f64(&mut self) -> f64 {
        if let Some(v) = self.next_double_normal.take() {
            return v;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_double_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// `torch.randn(n, generator=self)` for a contiguous float32 CPU tensor of `n` elements.
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        let mut data = vec![0f32; n];
        self.randn_into(&mut data);
        data
    }

    /// [`Self::randn`] written into `out` (`out.len()` elements).
    pub fn randn_into(&mut self, out: &mut [f32]) {
        let n = out.len();
        if n < 16 {
            for v in out.iter_mut() {
                *v = self.normal_f64() as f32;
            }
            return;
        }
        for v in out.iter_mut() {
            *v = self.uniform_f32();
        }
        for chunk in out.chunks_exact_mut(16) {
            normal_fill_16(chunk);
        }
        if !n.is_multiple_of(16) {
            // libtorch redraws the last 16 values (overlapping the previous block).
            let tail = &mut out[n - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            normal_fill_16(tail);
        }
    }
}

/// Box-Muller over 16 uniforms: element `j` pairs with `j + 8` (`NormalFill16<float>` for AVX2).
fn normal_fill_16(data: &mut [f32]) {
    let two_pi = (2.0 * std::f64::consts::PI) as f32;
    for j in 0..8 {
        let u1 = 1.0f32 - data[j];
        let u2 = data[j + 8];
        let radius = (-2.0f32 * cephes::log(u1)).sqrt();
        let theta = two_pi * u2;
        let (sin, cos) = cephes::sincos(theta);
        // `fmadd(n, std = 1, mean = 0)` is exact.
        data[j] = radius * cos;
        data[j + 8] = radius * sin;
    }
}

/// Scalar transcriptions of `log256_ps` and `sincos256_ps` (Cephes polynomials, Julien Pommier's
/// `sse_mathfun`) as compiled into libtorch, operation for operation and with the same fused
/// multiply-adds, so each lane gives the same float as the AVX2 code.
/// Constants are written as the C source does: a double literal rounded to float.
// The constants are transcribed digit for digit from the C source (a double literal rounded to float).
#[allow(clippy::excessive_precision, clippy::approx_constant)]
mod cephes {
    const SQRTHF: f32 = 0.707106781186547524_f64 as f32;
    const LOG_P: [f32; 9] = [
        7.0376836292E-2_f64 as f32,
        -1.1514610310E-1_f64 as f32,
        1.1676998740E-1_f64 as f32,
        -1.2420140846E-1_f64 as f32,
        1.4249322787E-1_f64 as f32,
        -1.6668057665E-1_f64 as f32,
        2.0000714765E-1_f64 as f32,
        -2.4999993993E-1_f64 as f32,
        3.3333331174E-1_f64 as f32,
    ];
    const LOG_Q1: f32 = -2.12194440e-4_f64 as f32;
    const LOG_Q2: f32 = 0.693359375_f64 as f32;
    const MIN_NORM_POS: f32 = f32::MIN_POSITIVE;

    const MINUS_DP1: f32 = -0.78515625_f64 as f32;
    const MINUS_DP2: f32 = -2.4187564849853515625e-4_f64 as f32;
    const MINUS_DP3: f32 = -3.77489497744594108e-8_f64 as f32;
    const SINCOF: [f32; 3] =
        [-1.9515295891E-4_f64 as f32, 8.3321608736E-3_f64 as f32, -1.6666654611E-1_f64 as f32];
    const COSCOF: [f32; 3] = [
        2.443315711809948E-005_f64 as f32,
        -1.388731625493765E-003_f64 as f32,
        4.166664568298827E-002_f64 as f32,
    ];
    const FOPI: f32 = 1.27323954473516_f64 as f32;

    /// `log256_ps` for one lane; the inputs here are in (0, 1].
    pub fn log(x: f32) -> f32 {
        if x <= 0.0 {
            return f32::NAN;
        }
        let x = x.max(MIN_NORM_POS);
        let bits = x.to_bits();
        let exponent = ((bits >> 23) as i32) - 0x7f;
        let mut x = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
        let mut e = exponent as f32 + 1.0;
        let below = x < SQRTHF;
        let tmp = if below { x } else { 0.0 };
        x -= 1.0;
        e -= if below { 1.0 } else { 0.0 };
        x += tmp;
        // libtorch's AVX2 build lets the compiler fuse these multiply-adds (seen in the disassembly of
        // `NormalFill16<float, true>` in libtorch_cpu.so 2.13.0), so the port fuses the same ones.
        let z = x * x;
        let mut y = LOG_P[0];
        for &p in &LOG_P[1..] {
            y = y.mul_add(x, p);
        }
        y *= x;
        y = y.mul_add(z, e * LOG_Q1);
        y = (-z).mul_add(0.5, y);
        x += y;
        e.mul_add(LOG_Q2, x)
    }

    /// `sincos256_ps` for one lane: returns `(sin x, cos x)`; the inputs here are in [0, 2π).
    pub fn sincos(x: f32) -> (f32, f32) {
        let sign_bit_sin = x.to_bits() & 0x8000_0000;
        let mut x = f32::from_bits(x.to_bits() & 0x7fff_ffff);
        let y = x * FOPI;
        // `_mm256_cvttps_epi32` truncates toward zero.
        let mut j = y as i32;
        j = (j + 1) & !1;
        let y = j as f32;
        let swap_sign_sin = ((j & 4) as u32) << 29;
        let poly_is_cos = (j & 2) == 0;
        x = y.mul_add(MINUS_DP1, x);
        x = y.mul_add(MINUS_DP2, x);
        x = y.mul_add(MINUS_DP3, x);
        let sign_bit_cos = ((!(j - 2) & 4) as u32) << 29;
        let sign_bit_sin = sign_bit_sin ^ swap_sign_sin;

        let z = x * x;
        let half_z = z * 0.5;
        let mut yc = COSCOF[0].mul_add(z, COSCOF[1]);
        yc = yc.mul_add(z, COSCOF[2]);
        yc *= z;
        yc = z.mul_add(yc, -half_z);
        yc += 1.0;

        let mut ys = SINCOF[0].mul_add(z, SINCOF[1]);
        ys = ys.mul_add(z, SINCOF[2]);
        ys *= z;
        ys = ys.mul_add(x, x);

        // poly_mask selects the sine polynomial for sin when set, the cosine one otherwise; the
        // AVX code computes `ysin = mask&ys + !mask&yc` and `ycos = (yc - !mask&yc) + (ys - mask&ys)`.
        let (ysin2, ysin1) = if poly_is_cos { (ys, 0.0) } else { (0.0, yc) };
        let ys_rest = ys - ysin2;
        let yc_rest = yc - ysin1;
        let sin = ysin1 + ysin2;
        let cos = yc_rest + ys_rest;
        (f32::from_bits(sin.to_bits() ^ sign_bit_sin), f32::from_bits(cos.to_bits() ^ sign_bit_cos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_matches_reference_sequence() {
        // The C++11 std::mt19937 default-seed check value: the 10000th output for seed 5489.
        let mut mt = Mt19937::new(5489);
        let mut last = 0;
        for _ in 0..10000 {
            last = mt.next_u32();
        }
        assert_eq!(last, 4_123_659_995);
    }

    #[test]
    fn cephes_functions_are_close_to_libm() {
        for i in 1..1000 {
            let u = i as f32 / 1000.0;
            assert!((cephes::log(u) - u.ln()).abs() <= 2e-7 * u.ln().abs().max(1.0), "log({u})");
            let theta = u * std::f32::consts::TAU;
            let (s, c) = cephes::sincos(theta);
            assert!((s - theta.sin()).abs() < 3e-7, "sin({theta})");
            assert!((c - theta.cos()).abs() < 3e-7, "cos({theta})");
        }
    }

    #[test]
    fn randn_tail_redraws_last_block() {
        let mut g = TorchGenerator::new(0);
        let v = g.randn(20);
        assert_eq!(v.len(), 20);
        assert!(v.iter().all(|x| x.is_finite()));
    }
}
