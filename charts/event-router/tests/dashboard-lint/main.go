// Command dashboard-lint checks the chart's Grafana dashboards.
//
// Two layers of checks:
//
//  1. Schema: each file is decoded with the strict decoder that the Grafana Foundation SDK
//     generates from Grafana's own dashboard schema (unknown fields, wrong types and missing
//     required fields are errors, panel options and Prometheus queries included), then validated
//     with the SDK's constraint checks.
//  2. Conventions every dashboard of this chart follows, in the spirit of Grafana's
//     dashboard-linter: a `datasource` variable of type datasource that every panel and query
//     uses, the template variables the dashboard declares it needs, a title and a description
//     on every panel (the README's panel guide relies on them), `$__rate_interval` in every
//     rate(), irate() and increase(), unique panel ids and refIds, panels inside the 24-column
//     grid.
//
// Usage: dashboard-lint -vars namespace,router,pod file.json [file.json...]
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"regexp"
	"strings"

	"github.com/grafana/grafana-foundation-sdk/go/cog"
	"github.com/grafana/grafana-foundation-sdk/go/cog/plugins"
	"github.com/grafana/grafana-foundation-sdk/go/dashboard"
)

// The loosely typed view used for the convention checks.
type rawDashboard struct {
	UID        string `json:"uid"`
	Title      string `json:"title"`
	Templating struct {
		List []struct {
			Name  string          `json:"name"`
			Type  string          `json:"type"`
			Query json.RawMessage `json:"query"`
		} `json:"list"`
	} `json:"templating"`
	Panels []rawPanel `json:"panels"`
}

type rawPanel struct {
	ID          int                `json:"id"`
	Type        string             `json:"type"`
	Title       string             `json:"title"`
	Description string             `json:"description"`
	Datasource  *rawDatasource     `json:"datasource"`
	GridPos     struct{ X, W int } `json:"gridPos"`
	Targets     []struct {
		RefID      string         `json:"refId"`
		Expr       string         `json:"expr"`
		Datasource *rawDatasource `json:"datasource"`
	} `json:"targets"`
	Panels []rawPanel `json:"panels"`
}

type rawDatasource struct {
	Type string `json:"type"`
	UID  string `json:"uid"`
}

// A range selector inside rate/irate/increase: `rate(metric{...}[5m])`.
var rangeFunc = regexp.MustCompile(`\b(rate|irate|increase)\s*\(`)
var rangeSel = regexp.MustCompile(`\[([^\]]+)\]`)

func main() {
	vars := flag.String("vars", "", "comma-separated template variables every dashboard must declare (besides datasource)")
	flag.Parse()
	if flag.NArg() == 0 {
		fmt.Fprintln(os.Stderr, "usage: dashboard-lint [-vars a,b] file.json...")
		os.Exit(2)
	}
	plugins.RegisterDefaultPlugins()

	failed := false
	for _, path := range flag.Args() {
		problems := lintFile(path, splitList(*vars))
		for _, p := range problems {
			fmt.Printf("%s: %s\n", path, p)
		}
		if len(problems) > 0 {
			failed = true
		} else {
			fmt.Printf("%s: ok\n", path)
		}
	}
	if failed {
		os.Exit(1)
	}
}

func splitList(s string) []string {
	var out []string
	for _, v := range strings.Split(s, ",") {
		if v = strings.TrimSpace(v); v != "" {
			out = append(out, v)
		}
	}
	return out
}

func lintFile(path string, requiredVars []string) []string {
	raw, err := os.ReadFile(path)
	if err != nil {
		return []string{err.Error()}
	}
	var problems []string

	var typed dashboard.Dashboard
	if err := realError(typed.UnmarshalJSONStrict(raw)); err != nil {
		problems = append(problems, "schema: "+err.Error())
	} else if err := realError(typed.Validate()); err != nil {
		problems = append(problems, "schema constraints: "+err.Error())
	}

	var d rawDashboard
	if err := json.Unmarshal(raw, &d); err != nil {
		return append(problems, "json: "+err.Error())
	}
	if d.UID == "" || d.Title == "" {
		problems = append(problems, "dashboard needs a uid and a title")
	}

	declared := map[string]string{}
	for _, v := range d.Templating.List {
		declared[v.Name] = v.Type
	}
	if declared["datasource"] != "datasource" {
		problems = append(problems, "needs a template variable `datasource` of type datasource")
	}
	for _, v := range requiredVars {
		if _, ok := declared[v]; !ok {
			problems = append(problems, fmt.Sprintf("needs a template variable %q", v))
		}
	}

	ids := map[int]bool{}
	var walk func(ps []rawPanel)
	walk = func(ps []rawPanel) {
		for _, p := range ps {
			where := fmt.Sprintf("panel %d %q", p.ID, p.Title)
			if ids[p.ID] {
				problems = append(problems, where+": duplicate panel id")
			}
			ids[p.ID] = true
			if p.GridPos.W <= 0 || p.GridPos.X+p.GridPos.W > 24 {
				problems = append(problems, where+": gridPos outside the 24-column grid")
			}
			if p.Title == "" {
				problems = append(problems, where+": no title")
			}
			if p.Type == "row" {
				walk(p.Panels)
				continue
			}
			if strings.TrimSpace(p.Description) == "" {
				problems = append(problems, where+": no description")
			}
			if !usesDatasourceVar(p.Datasource) {
				problems = append(problems, where+": panel datasource must be ${datasource}")
			}
			if len(p.Targets) == 0 {
				problems = append(problems, where+": no queries")
			}
			refs := map[string]bool{}
			for _, t := range p.Targets {
				if refs[t.RefID] || t.RefID == "" {
					problems = append(problems, where+": missing or duplicate refId "+t.RefID)
				}
				refs[t.RefID] = true
				if strings.TrimSpace(t.Expr) == "" {
					problems = append(problems, where+": query "+t.RefID+" has no expr")
				}
				if !usesDatasourceVar(t.Datasource) {
					problems = append(problems, where+": query "+t.RefID+" datasource must be ${datasource}")
				}
				if rangeFunc.MatchString(t.Expr) {
					for _, m := range rangeSel.FindAllStringSubmatch(t.Expr, -1) {
						if m[1] != "$__rate_interval" {
							problems = append(problems, fmt.Sprintf("%s: query %s uses [%s]; use [$__rate_interval]", where, t.RefID, m[1]))
						}
					}
				}
			}
		}
	}
	walk(d.Panels)
	return problems
}

// realError turns the SDK's empty error list (returned as a non-nil error interface) into nil.
func realError(err error) error {
	var list cog.BuildErrors
	if errors.As(err, &list) && len(list) == 0 {
		return nil
	}
	return err
}

func usesDatasourceVar(ds *rawDatasource) bool {
	return ds != nil && ds.Type == "prometheus" && (ds.UID == "${datasource}" || ds.UID == "$datasource")
}
