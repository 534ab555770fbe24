"""Multivariate Gaussians for the mixture-style families (GMM components, Gaussian HMM emissions).

Each Gaussian k is kept as its mean and the Cholesky factor of its *precision*, the parameterisation of
scikit-learn's GaussianMixture: with Sigma_k = C_k C_k^T (C_k lower triangular), prec_chol_k = C_k^{-T}
is upper triangular and Sigma_k^{-1} = prec_chol_k prec_chol_k^T. Then (Bishop 2006, eq. 2.43)

    log N(x | mu_k, Sigma_k) = -D/2 log(2 pi) + sum_d log prec_chol_k[d, d] - 1/2 || (x - mu_k)^T prec_chol_k ||^2

so a density costs one matrix product and no solve. Shapes by `covariance_type` (as in scikit-learn):

    covariance_type   prec_chol / covariances
    full              (K, D, D)
    tied              (D, D)        one covariance shared by all K
    diag              (K, D)        the diagonal (precision Cholesky = 1 / std)
    spherical         (K,)          one variance per component

The M-step works from weighted sufficient statistics (nk, sx, sxx) so that they can be summed over
batches and devices before it runs. Everything here is dtype-agnostic; callers use float64.
"""
from __future__ import annotations

import math
import typing
from typing import Dict, Literal, Optional, Tuple

import torch
from torch import Tensor

CovarianceType = Literal["full", "tied", "diag", "spherical"]
COVARIANCE_TYPES = typing.get_args(CovarianceType)


def check_covariance_type(covariance_type: str) -> None:
    if covariance_type not in COVARIANCE_TYPES:
        raise ValueError(f"covariance_type must be one of {COVARIANCE_TYPES}, not '{covariance_type}'")


def covariance_shape(n_components: int, dim: int, covariance_type: str) -> Tuple[int, ...]:
    """Shape of `covariances` and of `prec_chol` (they share it)."""
    check_covariance_type(covariance_type)
    return {
        "full": (n_components, dim, dim),
        "tied": (dim, dim),
        "diag": (n_components, dim),
        "spherical": (n_components,),
    }[covariance_type]


def unit_covariances(n_components: int, dim: int, covariance_type: str) -> Tensor:
    """Identity covariances in the layout of `covariance_type` (a neutral starting value)."""
    shape = covariance_shape(n_components, dim, covariance_type)
    if covariance_type in ("diag", "spherical"):
        return torch.ones(shape)
    return torch.eye(dim).expand(shape).clone()


def n_covariance_parameters(n_components: int, dim: int, covariance_type: str) -> int:
    """Free parameters of the covariances (a symmetric D x D matrix has D (D + 1) / 2)."""
    check_covariance_type(covariance_type)
    return {
        "full": n_components * dim * (dim + 1) // 2,
        "tied": dim * (dim + 1) // 2,
        "diag": n_components * dim,
        "spherical": n_components,
    }[covariance_type]


def gaussian_log_prob(x: Tensor, means: Tensor, prec_chol: Tensor, covariance_type: str) -> Tensor:
    """log N(x_n | mu_k, Sigma_k) for x (N, D), means (K, D): returns (N, K)."""
    n_components, dim = means.shape
    if covariance_type == "full":
        # y_nk = (x_n - mu_k)^T P_k for all k in one matrix product: [x_n, 1] @ [P_k; -mu_k^T P_k], (N, D+1) @ (D+1, K*D)
        w = torch.cat([prec_chol, -(means.unsqueeze(1) @ prec_chol)], 1).permute(1, 0, 2).reshape(dim + 1, n_components * dim)
        y = (torch.cat([x, x.new_ones(len(x), 1)], 1) @ w).view(len(x), n_components, dim)
        maha = torch.einsum("nkd,nkd->nk", y, y)
        log_det = torch.diagonal(prec_chol, dim1=-2, dim2=-1).log().sum(-1)
    elif covariance_type == "tied":
        # ||x P - mu_k P||^2 expanded, so that no (N, K, D) temporary is needed
        xp, mp = x @ prec_chol, means @ prec_chol
        maha = xp.square().sum(-1, keepdim=True) - 2 * (xp @ mp.T) + mp.square().sum(-1)
        log_det = torch.diagonal(prec_chol).log().sum()
    elif covariance_type == "diag":
        # ||(x - mu) * p||^2 = x^2 . p^2 - 2 x . (mu p^2) + mu^2 . p^2
        p2 = prec_chol.square()
        maha = (x.square() @ p2.T) - 2 * (x @ (means * p2).T) + (means.square() * p2).sum(-1)
        log_det = prec_chol.log().sum(-1)
    elif covariance_type == "spherical":
        p2 = prec_chol.square()
        maha = (x.square().sum(-1, keepdim=True) - 2 * (x @ means.T) + means.square().sum(-1)) * p2
        log_det = dim * prec_chol.log()
    else:
        check_covariance_type(covariance_type)
    return -0.5 * (dim * math.log(2 * math.pi) + maha) + log_det


def precision_cholesky(covariances: Tensor, covariance_type: str) -> Tensor:
    """Covariances -> precision Cholesky factors C^{-T} (same shape)."""
    check_covariance_type(covariance_type)
    if covariance_type in ("diag", "spherical"):
        if (covariances <= 0).any():
            raise ValueError("a variance is not positive: increase reg_covar")
        return covariances.rsqrt()
    chol, info = torch.linalg.cholesky_ex(covariances)
    if (info != 0).any():
        raise ValueError("a covariance is not positive definite: increase reg_covar")
    eye = torch.eye(chol.shape[-1], dtype=chol.dtype, device=chol.device).expand_as(chol)
    return torch.linalg.solve_triangular(chol, eye, upper=False).mT


def covariances_from_precision_cholesky(prec_chol: Tensor, covariance_type: str) -> Tensor:
    """Inverse of `precision_cholesky`: Sigma = (P P^T)^{-1}."""
    check_covariance_type(covariance_type)
    if covariance_type in ("diag", "spherical"):
        return prec_chol.square().reciprocal()
    eye = torch.eye(prec_chol.shape[-1], dtype=prec_chol.dtype, device=prec_chol.device).expand_as(prec_chol)
    chol = torch.linalg.solve_triangular(prec_chol.mT, eye, upper=False)  # C = P^{-T}
    return chol @ chol.mT


def sample_gaussians(means: Tensor, prec_chol: Tensor, covariance_type: str, components: Tensor,
                     generator: Optional[torch.Generator] = None) -> Tensor:
    """One draw from N(mu_k, Sigma_k) for each k in `components` (n,): x = mu_k + C_k z, C_k = prec_chol_k^{-T}."""
    z = torch.randn(len(components), means.shape[1], generator=generator, dtype=means.dtype, device=means.device)
    mu = means[components]
    if covariance_type in ("diag", "spherical"):
        scale = prec_chol[components].reciprocal()
        return mu + (z * scale if covariance_type == "diag" else z * scale[:, None])
    check_covariance_type(covariance_type)
    # C z = P^{-T} z: solve P^T y = z, P^T lower triangular
    p = prec_chol[components] if covariance_type == "full" else prec_chol.expand(len(components), -1, -1)
    return mu + torch.linalg.solve_triangular(p.mT, z.unsqueeze(-1), upper=False).squeeze(-1)


def sufficient_statistics(x: Tensor, resp: Tensor, covariance_type: str) -> Dict[str, Tensor]:
    """Weighted sums for the M-step, x (N, D), resp (N, K) (responsibilities / state posteriors):
    nk = sum_n r_nk, sx = sum_n r_nk x_n, and sxx = sum_n r_nk x_n x_n^T (full), its diagonal
    (diag, spherical) or sum_n (sum_k r_nk) x_n x_n^T (tied)."""
    check_covariance_type(covariance_type)
    stats = {"nk": resp.sum(0), "sx": resp.T @ x}
    if covariance_type == "full":
        # sum_n r_nk x_n x_n^T for all k as one (D, N) @ (N, K*D) product
        n, dim = x.shape
        weighted = (resp.unsqueeze(2) * x.unsqueeze(1)).view(n, -1)
        stats["sxx"] = (x.T @ weighted).view(dim, -1, dim).transpose(0, 1).contiguous()
    elif covariance_type == "tied":
        stats["sxx"] = (x * resp.sum(1, keepdim=True)).T @ x
    else:
        stats["sxx"] = resp.T @ x.square()
    return stats


def estimate_gaussians(nk: Tensor, sx: Tensor, sxx: Tensor, covariance_type: str,
                       reg_covar: float) -> Tuple[Tensor, Tensor]:
    """Maximum-likelihood means and covariances from `sufficient_statistics` (Bishop 2006, eqs. 9.24-9.25),
    with `reg_covar` added to every variance, as scikit-learn does. Returns (means, covariances)."""
    check_covariance_type(covariance_type)
    nk = nk + 10 * torch.finfo(nk.dtype).eps  # keeps an empty component finite (scikit-learn's guard)
    means = sx / nk[:, None]
    if covariance_type == "full":
        cov = sxx / nk[:, None, None] - means.unsqueeze(2) * means.unsqueeze(1)
        cov = cov + reg_covar * torch.eye(means.shape[1], dtype=cov.dtype, device=cov.device)
    elif covariance_type == "tied":
        cov = (sxx - (means * nk[:, None]).T @ means) / nk.sum()
        cov = cov + reg_covar * torch.eye(means.shape[1], dtype=cov.dtype, device=cov.device)
    else:
        cov = sxx / nk[:, None] - means.square() + reg_covar
        if covariance_type == "spherical":
            cov = cov.mean(1)
    return means, cov
