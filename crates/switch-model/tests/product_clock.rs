//! The product clock counts the FLOPs of the rows each product multiplies, forward and backward,
//! and nothing while off. Alone in its test binary: the clock is one per process.
use dfdx::prelude::*;
use switch_model::kernels::{expert_matmul_fused, param_matmul_fused, product_clock, Stacked};

#[test]
fn the_product_clock_counts_the_rows_multiplied_forward_and_backward() {
    let dev = Cpu::default();
    let (e, c, k, m) = (3, 8, 16, 32);
    let x: Tensor<(usize, usize, usize), f32, Cpu> = dev.sample_normal_like(&(e, c, k));
    let w: Tensor<(usize,), f32, Cpu> = dev.sample_normal_like(&(e * k * m,));
    let layout = Stacked { experts: e, k, m, transposed: false };

    let _ = param_matmul_fused(x.clone().leaky_traced(), &w, layout).sum().backward();
    assert_eq!(product_clock::read(), (0.0, 0.0), "off: nothing counted");

    product_clock::set(true);
    let _ = param_matmul_fused(x.clone().leaky_traced(), &w, layout).sum().backward();
    let (seconds, flops) = product_clock::read();
    assert_eq!(flops, (3 * 2 * e * c * k * m) as f64, "forward, ∂x and ∂W over every row");
    assert!(seconds > 0.0);

    // Experts using 8, 2 and 0 of their rows: the forward and ∂x multiply only those; ∂W too
    // through the own AVX-512 kernel (which these shapes take where it runs), every row through gemm.
    product_clock::set(true);
    let _ = expert_matmul_fused(x.leaky_traced(), &w, layout, &[8, 2, 0]).sum().backward();
    let dw_rows = if switch_model::kernels::slots::available() { 10 } else { e * c };
    assert_eq!(product_clock::read().1, (2 * 2 * 10 * k * m + 2 * dw_rows * k * m) as f64);
    product_clock::set(false);
    assert_eq!(product_clock::read(), (0.0, 0.0));
}
