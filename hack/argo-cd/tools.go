//go:build tools

// Package tools pins the one Argo CD command this module builds: ./cmd, every component in
// one binary (ARGOCD_BINARY_NAME picks the repo server or the application controller).
package tools

import (
	_ "github.com/argoproj/argo-cd/v3/cmd"
)
