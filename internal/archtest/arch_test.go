// Package archtest holds a test that docs/architecture.md and the import
// graph agree: the table there is what a newcomer reads to know where a
// change goes, so it must not drift from the code.
package archtest

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

const module = "github.com/imapproxy/imapproxy/"

// tools are not part of the proxy and not in the table.
var tools = []string{"bench", "cmd/imapbench", "cmd/imapproxy-demo"}

var quoted = regexp.MustCompile("`([a-z/]+)`")

// row is what the table says of a package: the imports it allows, and
// whether the row names several packages (the test harness), which it
// allows each of them without requiring any.
type row struct {
	imports []string
	shared  bool
}

// documented reads the package table.
func documented(t *testing.T, path string) map[string]row {
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	rows := map[string]row{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		cells := strings.Split(sc.Text(), "|")
		if len(cells) != 5 || !strings.HasPrefix(strings.TrimSpace(cells[1]), "`") {
			continue
		}
		var imports []string
		for _, m := range quoted.FindAllStringSubmatch(cells[3], -1) {
			imports = append(imports, m[1])
		}
		pkgs := quoted.FindAllStringSubmatch(cells[1], -1)
		for _, m := range pkgs {
			rows[m[1]] = row{imports, len(pkgs) > 1}
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return rows
}

// actual lists each package's imports of this module, from go list.
func actual(t *testing.T, root string) map[string][]string {
	cmd := exec.Command("go", "list", "-f", "{{.ImportPath}} {{join .Imports \" \"}}", "./...")
	cmd.Dir = root
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	pkgs := map[string][]string{}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		fields := strings.Fields(line)
		name := strings.TrimPrefix(fields[0], module)
		var ours []string
		for _, imp := range fields[1:] {
			if p, ok := strings.CutPrefix(imp, module); ok {
				ours = append(ours, p)
			}
		}
		slices.Sort(ours)
		pkgs[name] = ours
	}
	return pkgs
}

func TestImportsMatchArchitecture(t *testing.T) {
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	doc := documented(t, filepath.Join(root, "docs", "architecture.md"))
	if len(doc) < 10 {
		t.Fatalf("read %d rows from docs/architecture.md; the table's shape changed", len(doc))
	}
	for pkg, imports := range actual(t, root) {
		if slices.Contains(tools, pkg) {
			continue
		}
		r, ok := doc[pkg]
		if !ok {
			t.Errorf("package %s is not in docs/architecture.md", pkg)
			continue
		}
		for _, imp := range imports {
			if !slices.Contains(r.imports, imp) {
				t.Errorf("%s imports %s, which docs/architecture.md does not allow it", pkg, imp)
			}
		}
		if !r.shared {
			for _, imp := range r.imports {
				if !slices.Contains(imports, imp) {
					t.Errorf("docs/architecture.md says %s imports %s; it does not", pkg, imp)
				}
			}
		}
	}
	for pkg := range doc {
		if _, err := os.Stat(filepath.Join(root, pkg)); err != nil {
			t.Errorf("docs/architecture.md names %s, which does not exist", pkg)
		}
	}
}
