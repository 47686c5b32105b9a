package microsandbox

import (
	"context"
	"errors"
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestErrorDecodingAndIs(t *testing.T) {
	useFake(t, answers(map[string]string{
		"get": `{"error":{"kind":"sandbox_not_found","message":"no sandbox named x"}}`,
	}))
	_, err := GetSandbox(context.Background(), "x")
	if err == nil {
		t.Fatal("no error")
	}
	if !errors.Is(err, ErrSandboxNotFound) {
		t.Errorf("errors.Is(err, ErrSandboxNotFound) = false for %v", err)
	}
	if errors.Is(err, ErrSandboxStillRunning) || errors.Is(err, ErrFilesystem) {
		t.Errorf("matches another kind: %v", err)
	}
	var e *Error
	if !errors.As(err, &e) || e.Kind != ErrSandboxNotFound || e.Message != "no sandbox named x" || e.FsKind != "" {
		t.Errorf("errors.As: %#v", e)
	}
	if !IsKind(err, ErrSandboxNotFound) {
		t.Error("IsKind false")
	}
	if !errors.Is(err, &Error{Kind: ErrSandboxNotFound}) {
		t.Error("an *Error target of the same kind does not match")
	}
	if got := err.Error(); got != "sandbox_not_found: no sandbox named x" {
		t.Errorf("Error() = %q", got)
	}
	if errors.Is(err, context.Canceled) {
		t.Error("not-found matches context.Canceled")
	}
}

func TestFilesystemErrorKinds(t *testing.T) {
	useFake(t, answers(map[string]string{
		"fs.read":  `{"error":{"kind":"filesystem","message":"/nope: not found","fs_kind":"not_found"}}`,
		"fs.mkdir": `{"error":{"kind":"filesystem","message":"/x exists","fs_kind":"already_exists"}}`,
	}))
	sb := testSandbox(t, 3)
	_, err := sb.FS().Read(context.Background(), "/nope")
	var e *Error
	if !errors.As(err, &e) || e.Kind != ErrFilesystem || e.FsKind != FsKindNotFound {
		t.Fatalf("got %#v", err)
	}
	if !errors.Is(err, fs.ErrNotExist) || errors.Is(err, fs.ErrExist) {
		t.Errorf("io/fs sentinels: %v", err)
	}
	if !errors.Is(err, &Error{Kind: ErrFilesystem, FsKind: FsKindNotFound}) || errors.Is(err, &Error{Kind: ErrFilesystem, FsKind: FsKindReadOnly}) {
		t.Error("FsKind matching")
	}
	err = sb.FS().Mkdir(context.Background(), "/x")
	if !errors.Is(err, fs.ErrExist) {
		t.Errorf("mkdir: %v", err)
	}
}

// documentedKinds reads the kinds of the "## Error kinds" table of docs/bindings.md
// (rows "| `kind` | meaning |"), in order.
func documentedKinds(t *testing.T) []string {
	t.Helper()
	doc, err := os.ReadFile(filepath.Join("..", "docs", "bindings.md"))
	if err != nil {
		t.Fatal(err)
	}
	var kinds []string
	in := false
	for _, line := range strings.Split(string(doc), "\n") {
		if strings.HasPrefix(line, "## ") {
			in = strings.TrimSpace(line) == "## Error kinds"
			continue
		}
		if !in || !strings.HasPrefix(line, "| `") {
			continue
		}
		cell := strings.TrimSpace(strings.SplitN(strings.TrimPrefix(line, "|"), "|", 2)[0])
		if len(cell) < 3 || !strings.HasPrefix(cell, "`") || !strings.HasSuffix(cell, "`") {
			t.Fatalf("bindings.md: unreadable kind row %q", line)
		}
		kinds = append(kinds, strings.Trim(cell, "`"))
	}
	if len(kinds) < 40 {
		t.Fatalf("bindings.md: %d kinds in the Error kinds table: %v", len(kinds), kinds)
	}
	return kinds
}

// kindConstants reads errors.go's constants of type ErrorKind: value -> name.
func kindConstants(t *testing.T) map[string]string {
	t.Helper()
	file, err := parser.ParseFile(token.NewFileSet(), "errors.go", nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, decl := range file.Decls {
		gd, ok := decl.(*ast.GenDecl)
		if !ok || gd.Tok != token.CONST {
			continue
		}
		for _, spec := range gd.Specs {
			vs := spec.(*ast.ValueSpec)
			if id, ok := vs.Type.(*ast.Ident); !ok || id.Name != "ErrorKind" {
				continue
			}
			for i, name := range vs.Names {
				lit, ok := vs.Values[i].(*ast.BasicLit)
				if !ok || lit.Kind != token.STRING {
					t.Fatalf("%s: not a string literal", name.Name)
				}
				value, err := strconv.Unquote(lit.Value)
				if err != nil {
					t.Fatal(err)
				}
				if other, dup := out[value]; dup {
					t.Errorf("%s and %s are both %q", other, name.Name, value)
				}
				out[value] = name.Name
			}
		}
	}
	return out
}

func TestEveryDocumentedKindHasAConstant(t *testing.T) {
	documented := documentedKinds(t)
	constants := kindConstants(t)
	seen := map[string]bool{}
	for _, k := range documented {
		if seen[k] {
			t.Errorf("bindings.md lists %q twice", k)
		}
		seen[k] = true
		if _, ok := constants[k]; !ok {
			t.Errorf("kind %q of docs/bindings.md has no ErrorKind constant in errors.go", k)
		}
	}
	for value, name := range constants {
		if !seen[value] {
			t.Errorf("%s (%q) is not a kind of docs/bindings.md", name, value)
		}
	}
	// The constants the test read are the package's: spot checks.
	for _, k := range []ErrorKind{ErrSnapshotNotFound, ErrSandboxNotFound, ErrInvalidHandle, ErrNotATerminal, ErrInternal} {
		if constants[string(k)] == "" {
			t.Errorf("%q not read from errors.go", k)
		}
	}
}

func TestUnknownKindIsKept(t *testing.T) {
	useFake(t, answers(map[string]string{"remove": `{"error":{"kind":"brand_new","message":"m"}}`}))
	err := RemoveSandbox(context.Background(), "x")
	if !IsKind(err, ErrorKind("brand_new")) {
		t.Errorf("got %v", err)
	}
}

func TestMalformedAnswersAreInternal(t *testing.T) {
	for _, doc := range []string{`not json`, `{}`, `{"ok":{"sandbox":"seven"}}`} {
		useFake(t, answers(map[string]string{"create": doc}))
		_, err := CreateSandbox(context.Background(), "box")
		if !IsKind(err, ErrInternal) {
			t.Errorf("%s: got %v", doc, err)
		}
	}
}

// The fake core blocks until the call's context is done, then answers as the core does
// when its cancel token fires.
func blockUntilCancelled(ctx context.Context, c recordedCall) string {
	select {
	case <-ctx.Done():
		return `{"error":{"kind":"cancelled","message":"the call was cancelled"}}`
	case <-time.After(10 * time.Second):
		return `{"ok":null}`
	}
}

func TestCancelledContext(t *testing.T) {
	useFake(t, blockUntilCancelled)
	sb := testSandbox(t, 3)

	ctx, cancel := context.WithCancel(context.Background())
	go func() { time.Sleep(50 * time.Millisecond); cancel() }()
	start := time.Now()
	_, err := sb.Shell(ctx, "sleep 100")
	if time.Since(start) > 5*time.Second {
		t.Fatal("the cancel did not reach the call")
	}
	if !errors.Is(err, context.Canceled) || !errors.Is(err, ErrCancelled) {
		t.Errorf("got %v", err)
	}

	ctx2, cancel2 := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel2()
	_, err = sb.Exec(ctx2, "sleep", []string{"100"})
	if !errors.Is(err, context.DeadlineExceeded) || !errors.Is(err, ErrCancelled) {
		t.Errorf("deadline: got %v", err)
	}
}

func TestAlreadyCancelledContextNeverReachesTheCore(t *testing.T) {
	f := useFake(t, blockUntilCancelled)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := CreateSandbox(ctx, "box")
	if !errors.Is(err, context.Canceled) || !errors.Is(err, ErrCancelled) {
		t.Errorf("got %v", err)
	}
	if n := len(f.all()); n != 0 {
		t.Errorf("%d calls reached the core", n)
	}
}

func TestOkArrivingAfterCancelIsKept(t *testing.T) {
	// A call that completed as its context was cancelled keeps its result (a created
	// sandbox must not be lost).
	ctx, cancel := context.WithCancel(context.Background())
	useFake(t, func(context.Context, recordedCall) string {
		cancel()
		return refAnswer
	})
	sb, err := CreateSandbox(ctx, "box")
	disarm(t, sb)
	if err != nil || sb == nil {
		t.Fatalf("got %v", err)
	}
}
